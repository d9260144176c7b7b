"""Import of pre-quantized checkpoints (AutoAWQ gemm, GPTQ).

Every checkpoint here is written by the test itself from the format's documented packing
(not with kvplan's unpacker run backwards), and the int4 graph kvplan exports from it is
compared with a PyTorch model carrying the weights the test dequantized itself.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file

from kvplan.cli import build_main
from kvplan.decoder import DecoderStack, StackSpec
from kvplan.errors import QuantizeError
from kvplan.export import example_inputs
from kvplan.models import resolve
from kvplan.models.families import hf_config_dict as to_hf_dict
from kvplan.models.presets import PRESETS, random_tensor, tensor_shapes
from kvplan.quantize.checkpoint import imported
from kvplan.runtime.ort_session import session_options

CFG = PRESETS["tiny-llama"]         # hidden 64, intermediate 128: group size 32
G = 32
MODULES = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
AWQ_PACK_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]     # AutoAWQ gemm: nibble i holds column 8j + order[i]


def to_int32(words: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(words.astype(np.uint32).view(np.int32))


def pack_awq_columns(values: np.ndarray) -> torch.Tensor:
    """[rows, cols] of 0..15 -> int32 [rows, cols/8], AutoAWQ's gemm order."""
    rows, cols = values.shape
    words = np.zeros((rows, cols // 8), dtype=np.uint64)
    for j in range(cols // 8):
        for i, col in enumerate(AWQ_PACK_ORDER):
            words[:, j] |= values[:, 8 * j + col].astype(np.uint64) << (4 * i)
    return to_int32(words)


def pack_gptq_rows(values: np.ndarray) -> torch.Tensor:
    """[rows, cols] -> int32 [rows/8, cols]: nibble i of word j is row 8j + i."""
    rows, cols = values.shape
    words = np.zeros((rows // 8, cols), dtype=np.uint64)
    for j in range(rows // 8):
        for i in range(8):
            words[j] |= values[8 * j + i].astype(np.uint64) << (4 * i)
    return to_int32(words)


def pack_gptq_columns(values: np.ndarray) -> torch.Tensor:
    """[rows, cols] -> int32 [rows, cols/8]: nibble i of word j is column 8j + i."""
    return pack_gptq_rows(values.T.copy()).t().contiguous()


def shapes():
    return tensor_shapes(CFG)


def write_checkpoint(path: Path, method: str, symmetric: bool, desc_act: bool = False, drop: str | None = None,
                     reshape: str | None = None, extra_qc: dict | None = None) -> dict[str, torch.Tensor]:
    """A tiny-llama checkpoint in ``method``'s format; returns the dequantized torch weights [out, in]."""
    rng = np.random.default_rng(0)
    tensors, dequant = {}, {}
    for name, shape in shapes().items():
        if not any(m in name for m in MODULES):
            tensors[f"model.{name}"] = random_tensor(name, shape).to(torch.float16)
            dequant[name] = tensors[f"model.{name}"].float()
            continue
        out_f, in_f = shape
        base = f"model.{name.removesuffix('.weight')}"
        q = rng.integers(0, 16, size=(in_f, out_f))                              # W^T layout, unsigned
        # GPTQ v1 stores z - 1 in 4 bits, so its z is in 1..15 (z = 0 would overflow into the next nibble).
        lowest = 1 if method == "gptq" else 0
        z = np.full((in_f // G, out_f), 8) if symmetric else rng.integers(lowest, 16, size=(in_f // G, out_f))
        z[0, :2] = (8, 8) if symmetric else (lowest, 15)                         # the extremes are kept
        s = torch.from_numpy(rng.uniform(0.001, 0.004, size=(in_f // G, out_f))).to(torch.float16)
        groups = np.arange(in_f) // G
        if desc_act:
            groups = rng.permutation(groups)                                    # act-order: any row, any group
        w_t = (torch.from_numpy(q - z[groups]).float() * s.float()[groups])
        dequant[name] = w_t.t().contiguous()
        if method == "awq":
            tensors[f"{base}.qweight"] = pack_awq_columns(q)
            tensors[f"{base}.qzeros"] = pack_awq_columns(z)
        else:
            tensors[f"{base}.qweight"] = pack_gptq_rows(q)
            tensors[f"{base}.qzeros"] = pack_gptq_columns(z - 1)                 # GPTQ v1 stores zeros - 1
            tensors[f"{base}.g_idx"] = torch.from_numpy(groups.astype(np.int32))
        tensors[f"{base}.scales"] = s
    tensors["model.embed_tokens.weight"] = random_tensor("embed_tokens.weight", (256, 64)).half()
    tensors["lm_head.weight"] = random_tensor("lm_head.weight", (256, 64)).half()
    if drop:
        del tensors[drop]
    if reshape:
        tensors[reshape] = tensors[reshape][:, :-8].contiguous()
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    qc = {"quant_method": method, "bits": 4, "group_size": G}
    qc.update({"version": "gemm", "zero_point": not symmetric} if method == "awq" else
              {"desc_act": desc_act, "sym": symmetric, "checkpoint_format": "gptq"})
    qc.update(extra_qc or {})
    (path / "config.json").write_text(json.dumps({**to_hf_dict(CFG), "quantization_config": qc}))
    return dequant


def torch_reference(weights: dict[str, torch.Tensor]) -> DecoderStack:
    stack = DecoderStack(CFG, StackSpec(0, CFG.num_layers, True), torch.float16)
    stack.load_state_dict({k: v.to(torch.float16) for k, v in weights.items()}, strict=False)
    return stack.half().eval()


def build(tmp_path: Path, model: Path, profile: str = "fp16") -> Path:
    assert build_main(["--model", str(model), "--profile", profile, "--out", str(tmp_path / "out"),
                       "--stop-after", "quantize"]) == 0
    return tmp_path / "out" / model.name / profile


@pytest.mark.parametrize("method, symmetric, desc_act", [
    ("awq", False, False), ("awq", True, False), ("gptq", True, False), ("gptq", False, False),
    ("gptq", True, True), ("gptq", False, True)])
def test_checkpoint_exports_an_int4_graph_matching_pytorch_on_its_dequantized_weights(
        tmp_path, method, symmetric, desc_act):
    weights = write_checkpoint(tmp_path / "ckpt", method, symmetric, desc_act)
    target = build(tmp_path, tmp_path / "ckpt")
    graph = target / "decoder.int4.onnx"
    model = onnx.load(str(graph))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("DequantizeLinear") == 28
    assert ops.count("ReduceSum") == (0 if symmetric else 28)           # zero-point terms only when asymmetric
    assert ops.count("Gather") >= (28 if desc_act else 0)
    spec = StackSpec(0, CFG.num_layers, True)
    sess = ort.InferenceSession(str(graph), session_options(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    reference = torch_reference(weights)
    for n, last in ((6, 5), (1, 17)):
        inputs = example_inputs(CFG, spec, 1, torch.float16, n, last, seed=n)
        with torch.no_grad():
            want = [t.float().numpy() for t in reference(*inputs)]
        got = sess.run(None, dict(zip(names, [t.numpy() for t in inputs])))
        for g, w in zip(got, want):
            np.testing.assert_allclose(g.astype(np.float32), w, atol=2e-2, rtol=1e-2)


def test_imported_zero_points_are_exact_not_clamped(tmp_path):
    weights = write_checkpoint(tmp_path / "ckpt", "awq", symmetric=False)
    source = resolve(str(tmp_path / "ckpt"))
    name = "layers.0.self_attn.q_proj.weight"
    ql = source.checkpoint.linear(name)
    assert int(ql.q.min()) >= -8 and int(ql.q.max()) <= 7
    # z = 0 and z = 15 (both outside a symmetric int4's reach) dequantize to the checkpoint's values.
    torch.testing.assert_close(ql.dequantized(), weights[name], atol=0, rtol=1e-6)


def test_quantized_checkpoint_refuses_rtn_or_awq_on_top(tmp_path):
    write_checkpoint(tmp_path / "ckpt", "awq", symmetric=True)
    profile = tmp_path / "rtn.toml"
    from kvplan import profiles
    text = (profiles.PROFILES_DIR / "int4-awq.toml").read_text().replace('method = "awq"', 'method = "rtn"')
    profile.write_text(text.replace("group_size = 128", "group_size = 32"))
    with pytest.raises(QuantizeError, match=r"quantize.method = 'rtn': .* is already quantized \(awq\); its own "
                                            r"int4 values are used, never requantized"):
        from kvplan.target import BuildOptions
        from kvplan.target import build as build_target
        build_target(str(tmp_path / "ckpt"), str(profile), tmp_path / "out", BuildOptions(stop_after="quantize"),
                     log=lambda _: None)


@pytest.mark.parametrize("method, drop, reshape, message", [
    ("awq", "model.layers.1.mlp.up_proj.qzeros", None, r"tensor 'model.layers.1.mlp.up_proj.qzeros' is missing"),
    ("gptq", "model.layers.0.self_attn.k_proj.g_idx", None, r"tensor 'model.layers.0.self_attn.k_proj.g_idx' is missing"),
    ("awq", None, "model.layers.0.mlp.down_proj.scales",
     r"tensor 'model.layers.0.mlp.down_proj.scales': shape \[4, 56\], expected \[4, 64\]"),
])
def test_checkpoint_with_a_missing_or_misshaped_tensor_is_refused_naming_it(tmp_path, method, drop, reshape,
                                                                            message):
    write_checkpoint(tmp_path / "ckpt", method, symmetric=True, drop=drop, reshape=reshape)
    with pytest.raises(QuantizeError, match=message):
        source = resolve(str(tmp_path / "ckpt"))
        imported(source.checkpoint, log=lambda _: None)


@pytest.mark.parametrize("extra, message", [
    ({"bits": 8}, r"quantization_config.bits: 8 bits are not supported"),
    ({"group_size": -1}, r"quantization_config.group_size: -1 is not supported"),
    ({"version": "gemv"}, r"quantization_config.version: 'gemv': only AutoAWQ's gemm packing"),
])
def test_unsupported_quantization_config_is_refused_naming_the_field(tmp_path, extra, message):
    write_checkpoint(tmp_path / "ckpt", "awq", symmetric=True, extra_qc=extra)
    with pytest.raises(QuantizeError, match=message):
        resolve(str(tmp_path / "ckpt"))


def test_a_failed_import_leaves_no_int4_graph(tmp_path, capsys):
    write_checkpoint(tmp_path / "ckpt", "awq", symmetric=True, reshape="model.layers.1.self_attn.o_proj.scales")
    assert build_main(["--model", str(tmp_path / "ckpt"), "--profile", "fp16", "--out", str(tmp_path / "out"),
                       "--stop-after", "quantize"]) == 2
    assert "tensor 'model.layers.1.self_attn.o_proj.scales'" in capsys.readouterr().err
    target = tmp_path / "out" / "ckpt" / "fp16"
    assert not (target / "decoder.int4.onnx").exists() and not (target / "decoder.onnx").exists()


def test_int4_checkpoint_refuses_a_compute_capability_that_cannot_run_int4(tmp_path):
    from kvplan import profiles
    from kvplan.target import BuildOptions
    from kvplan.target import build as build_target
    write_checkpoint(tmp_path / "ckpt", "awq", symmetric=True)
    profile = tmp_path / "sm75.toml"
    profile.write_text((profiles.PROFILES_DIR / "fp16.toml").read_text()
                       .replace("compute_capabilities = []", 'compute_capabilities = ["7.5"]'))
    with pytest.raises(QuantizeError, match=r"engine.compute_capabilities: 7.5 cannot run int4"):
        build_target(str(tmp_path / "ckpt"), str(profile), tmp_path / "out", BuildOptions(stop_after="quantize"),
                     log=lambda _: None)
