"""What a command that decides something small loads: `kvplan presets`, `--help` and a rebuild with
nothing to do import none of the heavy libraries (torch, transformers, ONNX, ONNX Runtime,
Polygraphy, the TensorRT bindings); a stage imports its libraries when it runs."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch

from kvplan import models, stack
from kvplan.cli import build_main
from kvplan.decoder import DecoderStack
from kvplan.models import presets

HEAVY = ("torch", "transformers", "onnx", "onnx_ir", "onnxruntime", "onnxscript", "polygraphy", "onnx_graphsurgeon",
         "tensorrt_rtx", "tensorrt")


def loaded_after(code: str) -> list[str]:
    """The heavy modules in sys.modules after running ``code`` in a fresh interpreter."""
    probe = code + f"\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_listing_the_presets_and_the_help_import_no_heavy_library():
    assert loaded_after("from kvplan.cli import main; main(['presets'])") == []
    assert loaded_after("from kvplan.cli import main; main(['--help'])") == []


def test_a_rebuild_with_nothing_to_do_imports_no_heavy_library(tmp_path):
    assert build_main(["--model", "tiny-llama", "--profile", "fp32", "--out", str(tmp_path), "--stop-after",
                       "embed_head"]) == 0
    code = ("from kvplan.cli import build_main; "
            f"assert build_main(['--model', 'tiny-llama', '--profile', 'fp32', '--out', {str(tmp_path)!r}, "
            "'--stop-after', 'embed_head']) == 0")
    assert loaded_after(code) == []


def test_a_rebuild_of_built_engines_decides_without_the_tensorrt_bindings(tmp_path):
    args = ["--model", "tiny-llama", "--profile", "fp16", "--out", str(tmp_path)]
    assert build_main(args) == 0
    assert loaded_after(f"from kvplan.cli import build_main; assert build_main({args!r}) == 0") == []


def test_a_checkpoint_rebuild_with_nothing_to_do_reads_headers_without_torch(tmp_path, tiny_llama_checkpoint):
    args = ["--model", str(tiny_llama_checkpoint), "--profile", "fp32", "--out", str(tmp_path), "--stop-after", "surgery"]
    assert build_main(args) == 0
    assert loaded_after(f"from kvplan.cli import build_main; assert build_main({args!r}) == 0") == []


def test_the_default_model_is_the_presets_default():
    assert models.DEFAULT_MODEL == presets.DEFAULT


@pytest.mark.parametrize("variant", [{}, {"qkv_bias": True, "o_bias": True, "mlp_bias": True}, {"qk_norm": True},
                                     {"sandwich_norm": True}])
@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_the_decoders_tensor_shapes_are_known_without_building_it(name, variant):
    cfg = dataclasses.replace(presets.PRESETS[name], **variant)
    with torch.device("meta"):
        module = DecoderStack(cfg, stack.StackSpec(0, cfg.num_layers, True))
    assert list(stack.tensor_shapes(cfg).items()) == [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
