"""Faults in the export and what validation makes of them: weights the build was told to allow
(NaN/inf) and weights that overflow the profile's dtype.

Checkpoints are written by transformers' save_pretrained and then edited, as a broken conversion
script would leave them.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_weights_input import edited

from kvplan.cli import build_main, validate_main
from kvplan.validate.compare import compare_arrays

transformers = pytest.importorskip("transformers")
DOWN = "model.layers.1.mlp.down_proj.weight"
GAIN = "model.layers.1.post_attention_layernorm.weight"


def _with_inf(tiny_llama_checkpoint, tmp_path) -> Path:
    def poison(t):
        t[0, 0] = float("inf")
        return t
    return edited(tiny_llama_checkpoint, tmp_path, poison, DOWN)


# ------------------------------------------------- --allow-nonfinite-weights reaches validation

def test_allow_nonfinite_weights_with_validate_runs_validation_and_fails_it(tiny_llama_checkpoint, tmp_path, capsys):
    model = _with_inf(tiny_llama_checkpoint, tmp_path)
    code = build_main(["--model", str(model), "--profile", "fp32", "--out", str(tmp_path / "out"),
                       "--allow-nonfinite-weights", "--validate"])
    out, err = capsys.readouterr()
    assert "stale" not in err
    assert code == 1 and "validation FAIL" in out


def test_a_later_validation_of_a_nonfinite_build_needs_no_flag_and_fails(tiny_llama_checkpoint, tmp_path, capsys):
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

def test_a_weight_that_overflows_fp16_is_refused_naming_the_tensor(tiny_llama_checkpoint, tmp_path, capsys):
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
