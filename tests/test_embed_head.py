"""The embedding and LM-head graphs beside the decoder: built, listed, chained, and checked
against transformers' own ``*ForCausalLM`` logits."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_generate import profile_file
from test_tts_graphs import write_minicpmo

from kvplan import target as target_mod
from kvplan.cli import build_main, validate_main
from kvplan.errors import ProfileError
from kvplan.profiles import load
from kvplan.runtime.onnx import open_session
from kvplan.validate.tokens import validation_inputs
from kvplan.validate.whole_step import whole_step


def build(out: Path, model: str, profile: Path, *extra: str) -> Path:
    assert build_main(["--model", model, "--profile", str(profile), "--out", str(out), *extra]) == 0
    return out / Path(model).name / profile.stem


def with_head(root: Path, dtype: str = "float32", **head) -> Path:
    """The tiny concat profile with a [head] table."""
    path = profile_file(root, "concat", 0, dtype)
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in head.items())
    named = root / f"head-{'-'.join(f'{k}{v}' for k, v in head.items()) or 'plain'}-{dtype}.toml"
    named.write_text(path.read_text() + ("[head]\n" + lines if head else ""))
    return named


def whole(model: str, profile: Path, out: Path) -> dict:
    state = target_mod._current(model, str(profile), out, (), "checked")
    ids = validation_inputs(state.source, 1, 64, torch.float32).ids[0].tolist()
    return whole_step(state.source, state.profile, state.target, state.manifest, target_mod.decoder_packs(state),
                      ids, lambda _: None)


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-gemma2", "tiny-qwen3"])
def test_embed_decoder_head_give_transformers_causal_lm_logits(tmp_path, preset):
    """Gemma 2's √hidden embedding scale and final logit soft-cap included."""
    profile = with_head(tmp_path)
    build(tmp_path / "out", preset, profile, "--stop-after", "embed_head")
    record = whole(preset, profile, tmp_path / "out")
    assert record["ran"]
    for label, point in record["points"].items():
        assert point["within"] and point["top1"] == 1.0 and point["max_abs"] < 1e-3, (label, point)


def test_the_graphs_are_listed_with_their_contracts_and_chain_by_name(tmp_path):
    target = build(tmp_path / "out", "tiny-llama", with_head(tmp_path), "--stop-after", "embed_head")
    stage = json.loads((target / "manifest.json").read_text())["stages"]["embed_head"]
    graphs = {a["graph"]: a for a in stage["artifacts"]}
    assert set(graphs) == {"embed", "head"}
    assert graphs["embed"]["io"] == {"inputs": {"input_ids": {"shape": [1, "N"], "dtype": "int64"}},
                                     "outputs": {"hidden_in": {"shape": [1, "N", 64], "dtype": "float32"}}}
    assert graphs["head"]["io"]["inputs"] == {"hidden_out": {"shape": [1, "N", 64], "dtype": "float32"}}
    assert graphs["head"]["io"]["outputs"]["logits"]["shape"][:2] == [1, "N"]


def test_last_only_and_top_k_heads_return_the_last_rows_k_largest(tmp_path):
    plain = build(tmp_path / "a", "tiny-llama", with_head(tmp_path), "--stop-after", "embed_head")
    top = build(tmp_path / "b", "tiny-llama", with_head(tmp_path, last_only=True, top_k=5), "--stop-after",
                "embed_head")
    hidden = np.random.default_rng(0).standard_normal((1, 7, 64)).astype(np.float32)
    logits = open_session(plain / "head.onnx").run(None, {"hidden_out": hidden})[0]
    values, ids = open_session(top / "head.onnx").run(["top_values", "top_ids"], {"hidden_out": hidden})
    want = torch.topk(torch.from_numpy(logits[:, -1:]), 5, dim=-1)
    assert values.shape == (1, 1, 5) and (ids == want.indices.numpy()).all()
    np.testing.assert_allclose(values, want.values.numpy(), rtol=1e-6)
    record = whole("tiny-llama", with_head(tmp_path, last_only=True, top_k=5), tmp_path / "b")
    assert all(p["rows"] == 1 and p["top1"] == 1.0 and p["within"] for p in record["points"].values())


def test_an_int4_head_holds_int4_weights_and_matches_its_own_values(tmp_path):
    profile = with_head(tmp_path, "float32", weights="int4")
    target = build(tmp_path / "out", "tiny-llama", profile, "--stop-after", "embed_head")
    model = onnx.load(str(target / "head.onnx"))
    assert [t.data_type for t in model.graph.initializer if t.name == "lm_head.qweight"] == [onnx.TensorProto.INT4]
    assert "DequantizeLinear" in {n.op_type for n in model.graph.node}
    assert (target / "head.onnx").stat().st_size < 256 * 64 * 4 / 3    # a float32 head is 256 x 64 x 4 bytes
    record = whole("tiny-llama", profile, tmp_path / "out")
    assert all(p["within"] and p["top1"] == 1.0 for p in record["points"].values())


def test_the_engines_stage_builds_a_plan_per_graph(tmp_path, backend):
    target = build(tmp_path / "out", "tiny-llama", with_head(tmp_path, "float16", last_only=True))
    engines = json.loads((target / "manifest.json").read_text())["stages"]["engines"]
    plans = {a["path"]: a for a in engines["artifacts"]}
    assert {"decoder.plan", "embed.plan", "head.plan"} <= set(plans)
    assert plans["head.plan"]["build"]["profiles"]["decode"]["hidden_out"]["max"] == [1, 1, 64]


def test_a_minicpmo_checkpoint_gets_its_text_and_audio_ends(tmp_path):
    ckpt = tmp_path / "minicpmo"
    write_minicpmo(ckpt, "parametrizations")
    target = build(tmp_path / "out", str(ckpt), with_head(tmp_path), "--stop-after", "embed_head")
    stage = json.loads((target / "manifest.json").read_text())["stages"]["embed_head"]
    assert {a["graph"] for a in stage["artifacts"]} == {"embed", "embed_audio", "head_audio"}


@pytest.mark.parametrize("head, message", [
    ({"top_k": -1}, "head.top_k: must be >= 0"), ({"weights": "int8"}, "head.weights: unknown 'int8'"),
    ({"last": True}, "head.last: unknown field")])
def test_a_bad_head_table_is_refused_naming_the_field(tmp_path, head, message):
    with pytest.raises(ProfileError, match=message):
        load(str(with_head(tmp_path, **head)))


def test_a_top_k_beyond_the_vocabulary_is_refused(tmp_path, capsys):
    profile = with_head(tmp_path, top_k=5000)
    assert build_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(tmp_path / "out"),
                       "--stop-after", "embed_head"]) == 2
    assert "head.top_k 5000 exceeds the vocabulary's 256 rows" in capsys.readouterr().err


def test_validation_checks_the_whole_step_and_picks_the_task_checks_tokens_with_the_graphs(tmp_path):
    profile = with_head(tmp_path)
    target = build(tmp_path / "out", "tiny-llama", profile, "--stop-after", "embed_head")
    assert validate_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(tmp_path / "out"),
                          "--points", "opt", "--steps", "8"]) == 0
    record = json.loads((target / "manifest.json").read_text())["validation"]
    assert record["task"]["ends"] == "embed.onnx, head.onnx"
    assert record["whole_step"]["ran"] and set(record["whole_step"]["points"]) == {
        "prefill N=16 lastSum=0", "decode N=1 lastSum=16"}
