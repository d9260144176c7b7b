"""The whole pipeline on tiny presets: export -> surgery -> TensorRT-RTX engine, per shipped profile."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from kvplan import profiles
from kvplan.cli import build_main as main

pytest.importorskip("tensorrt_rtx", reason="the engines stage needs TensorRT-RTX (pip install 'kvplan[tensorrt-rtx]')")


def variant(tmp_path: Path, base: str, **export) -> str:
    """A copy of a shipped profile with some [export] fields changed, written as a TOML file."""
    text = (profiles.PROFILES_DIR / f"{base}.toml").read_text()
    for key, value in export.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    path = tmp_path / (base + "-" + re.sub(r"\W+", "", "-".join(f"{k}{v}" for k, v in export.items())) + ".toml")
    path.write_text(text)
    return str(path)


def build(out: Path, profile: str, model: str = "tiny-llama", *extra: str) -> dict:
    assert main(["--model", model, "--profile", profile, "--out", str(out), *extra]) == 0
    target = out / model / Path(profile).stem
    return json.loads((target / "manifest.json").read_text())


# bf16 is the slowest of these builds (15 s): slow, as is fp32 in kv_format 1 (fp16 builds both
# formats in the default run, fp32 format 0).
@pytest.mark.parametrize("base, kv_format", [("fp16", 0), ("fp16", 1), ("fp32", 0),
                                             pytest.param("fp32", 1, marks=pytest.mark.slow),
                                             pytest.param("bf16", 0, marks=pytest.mark.slow),
                                             pytest.param("bf16", 1, marks=pytest.mark.slow)])
def test_every_shipped_profile_builds_an_engine(tmp_path, base, kv_format):
    manifest = build(tmp_path, variant(tmp_path, base, kv_format=kv_format))
    assert manifest["status"] == "complete"
    assert list(manifest["stages"]) == ["export", "surgery", "embed_head", "engines"]
    [plan] = [a for a in manifest["stages"]["engines"]["artifacts"] if "pack" in a]
    assert {a["path"] for a in manifest["stages"]["engines"]["artifacts"] if "graph" in a} == {"embed.plan", "head.plan"}
    record = plan["build"]
    assert plan["path"] == "decoder.plan" and plan["bytes"] > 0
    assert set(record["profiles"]) == {"prefill", "decode"}
    kv_axis = 2 if kv_format == 0 else 1
    decode = record["profiles"]["decode"]
    def axis(shapes, i):
        return [shapes[k][i] for k in ("min", "opt", "max")]
    assert axis(decode["past_key_in0"], kv_axis) == [1, 302, 4094]
    assert axis(decode["attention_mask"], 3) == [2, 303, 4096]
    assert axis(record["profiles"]["prefill"]["hidden_in"], 1) == [1, 303, 512]
    ops = manifest["stages"]["surgery"]["artifacts"][0]["report"]["ops_after"]
    assert ops["RMSNormalization"] == 9 and ops["RotaryEmbedding"] == 8
    if "attention" in profiles.load(base).surgery.passes:
        assert ops["Attention"] == 4 and "Softmax" not in ops


@pytest.mark.slow  # a third engine build; delta graphs are validated by default (test_validate)
def test_delta_kv_io_builds_an_engine_whose_outputs_are_new_rows(tmp_path):
    manifest = build(tmp_path, variant(tmp_path, "fp16", kv_io='"delta"'))
    network = manifest["stages"]["engines"]["artifacts"][0]["build"]["network"]
    outputs = network["outputs"]
    assert "present_key0" in str(outputs) and "past_key0" not in str(outputs)


def test_inplace_kv_io_builds_kv_cache_update_layers_over_a_static_buffer(tmp_path):
    """kv_io = "inplace": TensorScatter maps to TensorRT's KV-cache update layer (two per decoder
    layer), attention stays fused, and the buffer's rows are one static length in every profile."""
    manifest = build(tmp_path, variant(tmp_path, "fp16", kv_io='"inplace"'))
    ops = manifest["stages"]["surgery"]["artifacts"][0]["report"]["ops_after"]
    assert ops["TensorScatter"] == 8 and ops["Attention"] == 4
    record = manifest["stages"]["engines"]["artifacts"][0]["build"]
    layers = record["network"]["layer_types"]
    assert layers["KV_CACHE_UPDATE"] == 8 and layers["ATTENTION_INPUT"] == 4
    for name, shapes in record["profiles"].items():
        assert {tuple(shapes["past_key_in0"][k]) for k in ("min", "opt", "max")} == {(1, 2, 4096, 16)}, name
        assert {shapes["attention_mask"][k][3] for k in ("min", "opt", "max")} == {4096}, name
        assert shapes["write_indices"]["max"] == [1]


# fp32 is slow: the fp16 build maps the same fused graph.
@pytest.mark.parametrize("base", ["fp16", pytest.param("fp32", marks=pytest.mark.slow)])
def test_fused_attention_maps_to_attention_layers_and_builds(tmp_path, base):
    manifest = build(tmp_path, variant(tmp_path, base, passes='["rmsnorm", "rope", "attention"]'))
    report = manifest["stages"]["surgery"]["artifacts"][0]["report"]
    assert report["ops_after"]["Attention"] == 4 and "Softmax" not in report["ops_after"]
    layers = manifest["stages"]["engines"]["artifacts"][0]["build"]["network"]["layer_types"]
    assert layers["ATTENTION_INPUT"] == 4 and layers["ATTENTION_OUTPUT"] == 4 and "SOFTMAX" not in layers


def test_decoder_packs_build_one_engine_each(tmp_path):
    manifest = build(tmp_path, variant(tmp_path, "fp16", decoder_pack_size=2))
    plans = [a["path"] for a in manifest["stages"]["engines"]["artifacts"] if "pack" in a]
    assert plans == ["decoder.pack0.plan", "decoder.pack1.plan"]
    second = manifest["stages"]["engines"]["artifacts"][1]["build"]["profiles"]["decode"]
    assert "past_key_in2" in second and "past_key_in0" not in second


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """tiny-llama built once with the fp32 profile, shared by the incremental tests."""
    out = tmp_path_factory.mktemp("incremental")
    build(out, "fp32")
    return out


class TestIncremental:
    def test_second_run_rebuilds_nothing_and_says_so(self, target, capsys):
        plan = target / "tiny-llama" / "fp32" / "decoder.plan"
        before = plan.stat().st_mtime_ns
        build(target, "fp32")
        out = capsys.readouterr().out
        for stage in ("export", "surgery", "engines"):
            assert f"[{stage}] up to date" in out
        assert "nothing to do" in out
        assert plan.stat().st_mtime_ns == before

    def test_inspect_prints_the_layer_summary_of_the_target(self, target, capsys):
        assert main(["--inspect", str(target / "tiny-llama" / "fp32")]) == 0
        out = capsys.readouterr().out
        assert "network of" in out.lower() and "input  past_key_in0" in out
        assert out.count("ROTARY_EMBEDDING") >= 8
        assert "no CUDA GPU visible" in out     # the engine inspector needs a deserialized engine

    def test_force_rebuilds(self, target, capsys):
        build(target, "fp32", "tiny-llama", "--force")
        out = capsys.readouterr().out
        assert "[engines] building" in out and "up to date" not in out

    def test_changed_profile_rebuilds_only_the_engine(self, target, tmp_path, capsys):
        text = (profiles.PROFILES_DIR / "fp32.toml").read_text().replace("N = [1, 303, 512]", "N = [1, 64, 512]")
        custom = tmp_path / "fp32.toml"     # same name: same target directory
        custom.write_text(text)
        build(target, str(custom))
        out = capsys.readouterr().out
        assert "[export] up to date" in out and "[surgery] up to date" in out and "[engines] building" in out


def test_build_killed_midway_leaves_no_plan_and_no_claim(tmp_path, monkeypatch, capsys):

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    profile = variant(tmp_path, "fp32", batch=1)
    build(tmp_path, profile)                    # a good build first: its claim must be withdrawn
    monkeypatch.setattr("kvplan.trt.build.build_engine", killed)
    assert main(["--model", "tiny-llama", "--profile", profile, "--out", str(tmp_path), "--force"]) == 130
    target = tmp_path / "tiny-llama" / Path(profile).stem
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["status"] != "complete" and "engines" not in manifest["stages"]
    assert not list(target.glob("*.plan")) and not list(target.glob(".*tmp*"))


@pytest.mark.slow
def test_default_model_builds_and_validates(tmp_path):
    """The README's main job on the full-size default model, then validation at the opt points."""
    from kvplan.cli import validate_main
    manifest = build(tmp_path, "fp16", "minicpmo26-tts")
    report = manifest["stages"]["surgery"]["artifacts"][0]["report"]["passes"]
    assert {k: v["fused"] for k, v in report.items()} == {"rmsnorm": 41, "rope": 40, "attention": 20}
    assert set(manifest["stages"]["engines"]["artifacts"][0]["build"]["profiles"]) == {"prefill", "decode"}
    assert validate_main(["--profile", "fp16", "--model", "minicpmo26-tts", "--out", str(tmp_path),
                          "--points", "opt", "--no-task"]) == 0


@pytest.mark.slow  # a checkpoint build end to end; the fitting itself is covered by test_profiles
def test_a_checkpoint_with_fewer_positions_gets_the_shipped_profile_fitted(tmp_path, capsys):
    """A Llama checkpoint with 2048 positions (written by transformers) builds with --profile fp16:
    the build says what it fitted, the manifest records the fitted shapes, and it validates."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kvplan.cli import validate_main
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=2048)
    ckpt = tmp_path / "llama-2048"
    LlamaForCausalLM(cfg).save_pretrained(ckpt)
    assert main(["--model", str(ckpt), "--profile", "fp16", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "profile fp16: prefill: N [1, 303, 512] -> [1, 303, 512], lastSum [0, 0, 3584] -> [0, 0, 1536]" in out
    manifest = json.loads((tmp_path / "out" / "llama-2048" / "fp16" / "manifest.json").read_text())
    recorded = {s["name"]: s for s in manifest["profile"]["engine"]["shapes"]}
    assert recorded["decode"]["lastSum"] == {"min": 1, "opt": 302, "max": 2046}   # N up to 2
    assert manifest["profile"]["adjusted"] and manifest["status"] == "complete"
    decode = manifest["stages"]["engines"]["artifacts"][0]["build"]["profiles"]["decode"]
    assert decode["past_key_in0"]["max"][2] == 2046
    assert validate_main(["--model", str(ckpt), "--profile", "fp16", "--out", str(tmp_path / "out"),
                          "--steps", "8"]) == 0
