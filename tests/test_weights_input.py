"""Weights a checkpoint should not hold: integer or bool tensors, NaN/inf, a wrong shape.

Each checkpoint is written by transformers' save_pretrained and then edited, as a broken
conversion script would leave it.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from kvplan.cli import build_main

transformers = pytest.importorskip("transformers")
TENSOR = "model.layers.1.mlp.down_proj.weight"


def edited(tiny_llama_checkpoint: Path, tmp_path: Path, change, name: str = TENSOR) -> Path:
    """A copy of the ``tiny_llama_checkpoint`` checkpoint with tensor ``name`` replaced by ``change(it)``."""
    out = tmp_path / "llama"
    out.mkdir()
    (out / "config.json").write_text((tiny_llama_checkpoint / "config.json").read_text())
    tensors = load_file(tiny_llama_checkpoint / "model.safetensors")
    tensors[name] = change(tensors[name].clone())
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


def _build(model: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    code = build_main(["--model", str(model), "--profile", "fp32", "--out", str(out), "--stop-after", "export",
                       *extra])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.bool])
def test_an_integer_or_bool_weight_is_refused_naming_it(tiny_llama_checkpoint, tmp_path, capsys, dtype):
    model = edited(tiny_llama_checkpoint, tmp_path, lambda t: (t * 100).to(dtype))
    code, err = _build(model, tmp_path / "out", capsys)
    assert code == 2 and f"tensor 'layers.1.mlp.down_proj.weight' has dtype {str(dtype)[6:]}" in err
    assert not list((tmp_path / "out").rglob("*.onnx"))


def test_nan_weights_are_refused_unless_allowed(tiny_llama_checkpoint, tmp_path, capsys):
    def poison(t):
        t = t.clone()
        t[0, :3] = float("nan")
        t[1, 0] = float("inf")
        return t
    model = edited(tiny_llama_checkpoint, tmp_path, poison)
    code, err = _build(model, tmp_path / "out", capsys)
    assert code == 2 and "tensor 'layers.1.mlp.down_proj.weight' holds 4 NaN or infinite value(s)" in err
    assert _build(model, tmp_path / "out", capsys, "--allow-nonfinite-weights")[0] == 0


def test_a_wrong_shape_is_refused_after_a_good_build(tiny_llama_checkpoint, tmp_path, capsys):
    """A build of the good checkpoint first; then one whose layer 1 has a wrong shape is refused."""
    assert _build(tiny_llama_checkpoint, tmp_path / "first", capsys)[0] == 0
    model = edited(tiny_llama_checkpoint, tmp_path, lambda t: t[:, :-1].contiguous())
    code, err = _build(model, tmp_path / "out", capsys)
    # Refused where the checkpoint is opened, from its header, naming the config field that disagrees.
    assert code == 2 and "tensor 'model.layers.1.mlp.down_proj.weight' has shape [32, 63], but " in err \
        and "config.json's intermediate_size = 64 needs [32, 64]" in err
    manifest = tmp_path / "out" / "llama" / "fp32" / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["status"] != "complete"
