"""Every layer's linears become int4, whatever the checkpoint's tensors have in common.

A checkpoint as transformers initialises it has every norm gain 1.0; trained ones share zero
biases, tied norms, even whole layers. The exporter may merge equal small constants, but the
quantize stage finds each linear by the mark the exporter puts on its MatMul, and refuses a
graph in which any quantized linear did not become int4.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from test_quantize import write_profile
from test_quantize_checkpoint import pack_awq_columns

from kvplan.cli import build_main
from kvplan.decoder import pack_specs
from kvplan.errors import QuantizeError
from kvplan.export import export_pack
from kvplan.export.emit import LINEAR_MARK
from kvplan.models import resolve
from kvplan.profiles import Quantize
from kvplan.quantize.graph import quantize_graph
from kvplan.quantize.stage import quantize_rtn

LINEARS = 7
G = 32


def hf_checkpoint(path: Path, layers: int = 3, model_type: str = "llama", twin_layers: bool = False) -> Path:
    """A checkpoint as transformers initialises and saves it (every norm gain 1.0; Qwen2: every
    q/k/v bias 0). ``twin_layers``: layer 1 a byte-identical copy of layer 0."""
    config = transformers.AutoConfig.for_model(
        model_type, hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    if twin_layers:
        model.model.layers[1].load_state_dict(model.model.layers[0].state_dict())
    model.save_pretrained(path)
    return path


def int4_dequantize_count(path: Path) -> int:
    model = onnx.load(str(path))
    int4 = {t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4}
    return sum(1 for n in model.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int4)


def build(out: Path, model: Path, profile: str, *extra: str) -> Path:
    assert build_main(["--model", str(model), "--profile", profile, "--out", str(out), *extra]) == 0
    return out / model.name / Path(profile).stem


def test_transformers_initialised_checkpoint_gets_every_layer_in_int4_with_rtn(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "llama3")
    target = build(tmp_path / "out", ckpt, write_profile(tmp_path, method='"rtn"', group_size=G),
                   "--stop-after", "quantize")
    assert int4_dequantize_count(target / "decoder.int4.onnx") == 3 * LINEARS
    manifest = json.loads((target / "manifest.json").read_text())
    (graph,) = [a for a in manifest["stages"]["quantize"]["artifacts"] if "pack" in a]
    assert (graph["linears"], graph["linears_in_graph"]) == (21, 21)


def test_awq_folds_its_scales_into_each_layers_own_norm_gains_when_all_gains_are_equal(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "llama3")
    target = build(tmp_path / "out", ckpt, write_profile(tmp_path, group_size=G, samples=1, tokens=16),
                   "--stop-after", "quantize")
    assert int4_dequantize_count(target / "decoder.int4.onnx") == 3 * LINEARS
    graph = onnx.load(str(target / "decoder.int4.onnx"))
    gains = {t.name: onnx.numpy_helper.to_array(t) for t in graph.graph.initializer
             if t.name.endswith("input_layernorm.weight")}
    assert sorted(gains) == [f"layers.{i}.input_layernorm.weight" for i in range(3)]
    assert not np.array_equal(gains["layers.0.input_layernorm.weight"], gains["layers.1.input_layernorm.weight"])


def write_awq(src: Path, dst: Path) -> None:
    """``src``'s checkpoint in AutoAWQ gemm format: each linear quantized asymmetrically per group of
    G input channels by the test (z, s from the group's range), packed in AutoAWQ's order."""
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, w in tensors.items():
        if not name.endswith("_proj.weight"):
            out[name] = w
            continue
        w_t = w.float().t().numpy()                                             # [in, out]
        groups = w_t.reshape(-1, G, w_t.shape[1])
        lo, hi = groups.min(1), groups.max(1)
        s = np.maximum(hi - lo, 1e-6) / 15
        z = np.clip(np.round(-lo / s), 0, 15)
        q = np.clip(np.round(groups / s[:, None] + z[:, None]), 0, 15).reshape(w_t.shape)
        base = name.removesuffix(".weight")
        out[f"{base}.qweight"] = pack_awq_columns(q.astype(np.int64))
        out[f"{base}.qzeros"] = pack_awq_columns(z.astype(np.int64))
        out[f"{base}.scales"] = torch.from_numpy(np.ascontiguousarray(s)).half()
    dst.mkdir()
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": G, "version": "gemm",
                                     "zero_point": True}
    (dst / "config.json").write_text(json.dumps(config))


def test_autoawq_checkpoint_with_equal_norm_gains_imports_every_layer_and_validates_the_int4_graph(tmp_path):
    awq = tmp_path / "llama3-awq"
    write_awq(hf_checkpoint(tmp_path / "llama3"), awq)
    target = build(tmp_path / "out", awq, "fp16", "--stop-after", "surgery")
    assert int4_dequantize_count(target / "decoder.int4.onnx") == 3 * LINEARS
    assert int4_dequantize_count(target / "decoder.fused.onnx") == 3 * LINEARS
    assert build_main(["--model", str(awq), "--profile", "fp16", "--out", str(tmp_path / "out"),
                       "--stop-after", "surgery", "--validate"]) == 0
    validation = json.loads((target / "manifest.json").read_text())["validation"]
    assert validation["status"] == "pass"
    assert {"decoder.int4.onnx", "decoder.fused.onnx"} <= set(validation["artifacts"])
    assert "decoder.onnx" not in validation["artifacts"]


def test_zero_biases_and_two_byte_identical_layers_each_keep_their_own_int4_linears(tmp_path):
    ckpt = hf_checkpoint(tmp_path / "qwen2", model_type="qwen2", twin_layers=True)
    target = build(tmp_path / "out", ckpt, write_profile(tmp_path, method='"rtn"', group_size=G),
                   "--stop-after", "quantize")
    assert int4_dequantize_count(target / "decoder.int4.onnx") == 3 * LINEARS
    graph = onnx.load(str(target / "decoder.onnx"))
    marks = Counter(next(p.value for p in n.metadata_props if p.key == LINEAR_MARK)
                    for n in graph.graph.node if any(p.key == LINEAR_MARK for p in n.metadata_props))
    assert len(marks) == 3 * LINEARS and set(marks.values()) == {1}
    names = {t.name for t in graph.graph.initializer}
    assert {f"layers.{i}.self_attn.q_proj.bias" for i in range(3)} <= names


def test_a_graph_whose_linear_is_not_marked_is_refused_and_nothing_is_written(tmp_path):
    source = resolve("tiny-llama")
    spec = pack_specs(source.config, 0, 0)[0]
    export_pack(source, spec, "float16", 1, tmp_path / "decoder.onnx")
    graph = onnx.load(str(tmp_path / "decoder.onnx"))
    node = next(n for n in graph.graph.node if any(p.value == "layers.2.mlp.up_proj.weight" for p in n.metadata_props))
    del node.metadata_props[:]
    onnx.save(graph, str(tmp_path / "decoder.onnx"))
    quantized = quantize_rtn(source, Quantize(method="rtn", group_size=G), log=lambda _: None)
    with pytest.raises(QuantizeError, match=r"tensor 'layers.2.mlp.up_proj.weight': no MatMul of the graph is "
                                            r"marked as computing it"):
        quantize_graph(tmp_path / "decoder.onnx", tmp_path / "decoder.int4.onnx", quantized, source.read_tensors,
                       range(source.config.num_layers))
    assert not (tmp_path / "decoder.int4.onnx").exists()
