"""Faults in the export and what validation makes of them: weights the build was told to allow
(NaN/inf), weights that overflow the profile's dtype, and trace-cache entries that are valid ONNX
but not the piece their name stands for.

Checkpoints are written by transformers' save_pretrained and then edited, as a broken conversion
script would leave them.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from test_weights_input import edited

import kvplan.export.stitch as stitch
from kvplan.cli import build_main, validate_main
from kvplan.decoder import pack_specs
from kvplan.export.exporter import export_pack
from kvplan.export.trace_cache import TraceCache
from kvplan.models import resolve
from kvplan.validate.compare import compare_arrays

transformers = pytest.importorskip("transformers")
DOWN = "model.layers.1.mlp.down_proj.weight"
GAIN = "model.layers.1.post_attention_layernorm.weight"


def _with_inf(tiny_llama_checkpoint, tmp_path) -> Path:
    def poison(t):
        t[0, 0] = float("inf")
        return t
    return edited(tiny_llama_checkpoint, tmp_path, poison, DOWN)


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPLAN_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


# ------------------------------------------------- --allow-nonfinite-weights reaches validation

def test_allow_nonfinite_weights_with_validate_runs_validation_and_fails_it(tiny_llama_checkpoint, tmp_path, capsys, cache_dir):
    model = _with_inf(tiny_llama_checkpoint, tmp_path)
    code = build_main(["--model", str(model), "--profile", "fp32", "--out", str(tmp_path / "out"),
                       "--allow-nonfinite-weights", "--validate"])
    out, err = capsys.readouterr()
    assert "stale" not in err
    assert code == 1 and "validation FAIL" in out


def test_a_later_validation_of_a_nonfinite_build_needs_no_flag_and_fails(tiny_llama_checkpoint, tmp_path, capsys, cache_dir):
    """The manifest records the flag: python -m build.validate, which has no such flag, checks
    the target as it was built."""
    model = _with_inf(tiny_llama_checkpoint, tmp_path)
    target = ["--model", str(model), "--profile", "fp32", "--out", str(tmp_path / "out")]
    assert build_main(target + ["--allow-nonfinite-weights", "--stop-after", "surgery"]) == 0
    manifest = json.loads((tmp_path / "out/llama/fp32/manifest.json").read_text())
    assert manifest["stages"]["export"]["inputs"]["allow_nonfinite"] is True
    capsys.readouterr()
    code = validate_main(target + ["--points", "min", "--no-task"])
    out, err = capsys.readouterr()
    assert "stale" not in err
    assert code == 1 and "built with --allow-nonfinite-weights" in out and "validation FAIL" in out


# ------------------------------------------------- finite as the graph stores it

def test_a_weight_that_overflows_fp16_is_refused_naming_the_tensor(tiny_llama_checkpoint, tmp_path, capsys, cache_dir):
    model = edited(tiny_llama_checkpoint, tmp_path, lambda t: torch.full_like(t, 1e6), GAIN)
    code = build_main(["--model", str(model), "--profile", "fp16", "--out", str(tmp_path / "out"),
                       "--stop-after", "export"])
    err = capsys.readouterr().err
    assert code == 2
    assert "tensor 'layers.1.post_attention_layernorm.weight' overflows float16" in err and "65504" in err
    assert not list((tmp_path / "out").rglob("*.onnx"))


@pytest.mark.parametrize("case", ["bit-identical outputs", "the same inf, other elements differing",
                                  "inf against a finite reference"])
def test_a_non_finite_value_on_either_side_fails_the_comparison_and_says_so(case):
    want = np.linspace(-1, 1, 64, dtype=np.float16).reshape(1, 2, 32)
    want[0, 1, 5] = np.inf
    got = want.copy()
    if case == "the same inf, other elements differing":
        got[0, 0, :4] += np.float16(0.001)
    elif case == "inf against a finite reference":
        want[0, 1, 5] = 1.0
    stats = compare_arrays(want, got, 0.05, 0.02, point="p", pack=0, pair="a vs b", output="hidden_out")
    assert not stats.passed
    assert stats.worst_index == (0, 1, 5) and "NaN/inf in output" in stats.note


# ------------------------------------------------- trace-cache entries checked against their key

@pytest.fixture(scope="module")
def cold_cache(tmp_path_factory):
    """A cache holding one trace of tiny-qwen2 (float32) and the decoder.onnx it gave."""
    root = tmp_path_factory.mktemp("trace")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(stitch, "_PIECES", {})       # traced here, not taken from this process's memory
        path = _export(root / "cold", TraceCache(root / "cache"), log=None)
    return root / "cache", path.read_bytes()


def _export(where: Path, cache: TraceCache, log) -> Path:
    source = resolve("tiny-qwen2")
    [spec] = pack_specs(source.config, 0)
    path = where / "decoder.onnx"
    export_pack(source, spec, "float32", 1, path, log=log, trace_cache=cache)
    return path


def _rotary_over_layer(directory: Path) -> Path:
    [layer] = directory.glob("layer-*.onnx")
    [rotary] = directory.glob("rotary-*.onnx")
    shutil.copyfile(rotary, layer)
    return layer


def _without_key_digest(directory: Path) -> Path:
    [layer] = directory.glob("layer-*.onnx")
    model = onnx.load(layer)
    kept = [p for p in model.metadata_props if p.key != "kvplan.digest"]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    onnx.save(model, layer)
    return layer


@pytest.mark.parametrize("damage", [_rotary_over_layer, _without_key_digest], ids=["another piece", "no key digest"])
def test_an_entry_not_written_for_its_key_is_reported_traced_again_and_replaced(cold_cache, tmp_path, monkeypatch,
                                                                               damage):
    cache_root, cold = cold_cache
    shutil.copytree(cache_root, tmp_path / "cache")
    cache = TraceCache(tmp_path / "cache")
    entry = damage(cache.directory)
    monkeypatch.setattr(stitch, "_PIECES", {})
    notes = []
    path = _export(tmp_path / "again", cache, log=notes.append)
    said = [n for n in notes if "trace cache entry" in n]
    assert len(said) == 1 and str(entry) in said[0] and "not made for this key" in said[0]
    assert path.read_bytes() == cold and sorted(cache.stored) == ["layer", "norm", "rotary"]
    monkeypatch.setattr(stitch, "_PIECES", {})
    source = resolve("tiny-qwen2")
    key = (source.config, torch.float32, 1, 0, "concat")
    assert TraceCache(tmp_path / "cache").load_set(key, ["rotary", "layer", "norm"]) is not None


def test_a_rebuild_over_another_pieces_entry_keeps_a_whole_decoder_onnx(tmp_path, monkeypatch, capsys, cache_dir):
    args = ["--model", "tiny-llama", "--profile", "fp32", "--stop-after", "export", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(stitch, "_PIECES", {})
    assert build_main(args) == 0
    graph = tmp_path / "out/tiny-llama/fp32/decoder.onnx"
    built = graph.read_bytes()
    entry = _rotary_over_layer(cache_dir / "traces")
    monkeypatch.setattr(stitch, "_PIECES", {})
    capsys.readouterr()
    assert build_main(args + ["--force"]) == 0
    assert str(entry) in capsys.readouterr().out
    assert graph.read_bytes() == built
