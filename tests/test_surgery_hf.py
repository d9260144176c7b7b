"""Surgery on a graph traced from transformers' own Llama modules (a graph a user brings).

The wrapper is what the original export script did: HF's LlamaDecoderLayers and
final LlamaRMSNorm, cos/sin from LlamaRotaryEmbedding, and the past k/v passed
explicitly and concatenated by a duck-typed cache. Exported with the TorchScript
exporter at opset 17, so surgery also has to raise the opset (ReduceMean's axes
attribute, Constant nodes, Identity-aliased weights, Shape-computed slice bounds).
"""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from kvplan import surgery

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding  # noqa: E402

LAYERS, HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 3, 64, 4, 2, 16


class ExplicitPast:
    """Stands in for a transformers Cache: concatenates the given past k/v, records the present."""

    def __init__(self, past):
        self.past, self.present = past, {}

    def update(self, k, v, layer_idx, *args, **kwargs):
        pk, pv = self.past[layer_idx]
        k, v = torch.cat((pk, k), dim=2), torch.cat((pv, v), dim=2)
        self.present[layer_idx] = (k, v)
        return k, v


class HFStack(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.ModuleList([LlamaDecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = LlamaRMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.rotary = LlamaRotaryEmbedding(cfg)
        with torch.no_grad():  # norm gains away from 1, so a dropped scale would show
            for p in self.parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn_like(p))

    def forward(self, hidden, mask, position_ids, *past):
        cache = ExplicitPast([(past[2 * i], past[2 * i + 1]) for i in range(len(self.layers))])
        pos_emb = self.rotary(hidden, position_ids)
        for layer in self.layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position_ids, cache=cache,
                           position_embeddings=pos_emb)
        out = [self.norm(hidden)]
        for i in range(len(self.layers)):
            out += list(cache.present[i])
        return tuple(out)


def names():
    ins = ["hidden_in", "attention_mask", "position_ids"]
    outs = ["hidden_out"]
    for i in range(LAYERS):
        ins += [f"past_key_in{i}", f"past_value_in{i}"]
        outs += [f"past_key{i}", f"past_value{i}"]
    return ins, outs


def inputs(n, last, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(1, 1, n, last + n)
    mask.masked_fill_(torch.arange(last + n)[None, :] > torch.arange(last, last + n)[:, None], -1e9)
    past = [torch.randn(1, KV_HEADS, last, HEAD_DIM, generator=g) for _ in range(2 * LAYERS)]
    return (torch.randn(1, n, HIDDEN, generator=g), mask, torch.arange(last, last + n)[None], *past)


@pytest.fixture(scope="module")
def hf_graph(tmp_path_factory):
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      rms_norm_eps=1e-5, max_position_embeddings=512, vocab_size=32)
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    stack = HFStack(cfg).eval()
    ins, outs = names()
    dyn = {"hidden_in": {1: "N"}, "attention_mask": {2: "N", 3: "sumN"}, "position_ids": {1: "N"},
           "hidden_out": {1: "N"}}
    dyn.update({k: {2: "lastSum"} for k in ins[3:]})
    dyn.update({k: {2: "sumN"} for k in outs[1:]})
    path = tmp_path_factory.mktemp("hf") / "hf_llama.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(stack, inputs(3, 5), str(path), dynamo=False, opset_version=17,
                          input_names=ins, output_names=outs, dynamic_axes=dyn)
    return path


@pytest.fixture(scope="module")
def hf_fused(hf_graph):
    return surgery.run(onnx.load(hf_graph), ["rmsnorm", "rope"], log=None)


def test_hf_traced_llama_fuses_exact_counts(hf_graph, hf_fused):
    assert {o.domain: o.version for o in onnx.load(hf_graph).opset_import}[""] == 17
    fused, report = hf_fused
    assert report["passes"]["rmsnorm"] == {"fused": 2 * LAYERS + 1, "near_misses": []}
    assert report["passes"]["rope"] == {"fused": 2 * LAYERS, "near_misses": []}
    counts = report["ops_after"]
    assert counts["RMSNormalization"] == 2 * LAYERS + 1 and counts["RotaryEmbedding"] == 2 * LAYERS
    assert "Neg" not in counts and "ReduceMean" not in counts and "Sqrt" not in counts
    assert {o.domain: o.version for o in fused.opset_import}[""] == 23


@pytest.mark.parametrize("n,last", [(8, 0), (1, 302), (10, 303)])
def test_hf_traced_fused_matches_unfused_in_onnxruntime(hf_graph, hf_fused, n, last):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    ref = ort.InferenceSession(str(hf_graph), so, providers=["CPUExecutionProvider"])
    fused = ort.InferenceSession(hf_fused[0].SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = {k: v.numpy() for k, v in zip(names()[0], inputs(n, last, seed=1))}
    for want, got in zip(ref.run(None, feeds), fused.run(None, feeds)):
        assert got.shape == want.shape
        assert float(np.abs(got - want).max()) <= 1e-4


def _export(impl: str, path) -> None:
    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=128, num_hidden_layers=LAYERS,
                      num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
                      rms_norm_eps=1e-5, max_position_embeddings=512, vocab_size=32)
    cfg._attn_implementation = impl
    torch.manual_seed(0)
    ins, outs = names()
    dyn = {"hidden_in": {1: "N"}, "attention_mask": {2: "N", 3: "sumN"}, "position_ids": {1: "N"},
           "hidden_out": {1: "N"}}
    dyn.update({k: {2: "lastSum"} for k in ins[3:]})
    dyn.update({k: {2: "sumN"} for k in outs[1:]})
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(HFStack(cfg).eval(), inputs(3, 5), str(path), dynamo=False, opset_version=17,
                          input_names=ins, output_names=outs, dynamic_axes=dyn)


@pytest.mark.parametrize("impl, breaks", [
    ("eager", r"the probabilities \(/layers\.\d/self_attn/Cast_4_output_0\) feed Cast \(/layers\.\d/self_attn/Cast_5\)"),
    ("sdpa", r"the second operand of /layers\.\d/self_attn/MatMul is Mul \(/layers\.\d/self_attn/Mul_9\)"),
])
def test_transformers_attention_that_is_not_fused_names_the_node_that_breaks_the_pattern(tmp_path, impl, breaks):
    """transformers' eager attention casts the fp32 softmax back (a Cast chain before ·V) and sdpa
    scales q and k by sqrt(scale) each; neither is the pattern the attention pass proves exact, so
    each layer is a near miss that names the node and the tensor where the pattern breaks."""
    import re
    _export(impl, tmp_path / f"{impl}.onnx")
    _, report = surgery.run(onnx.load(tmp_path / f"{impl}.onnx"), ["rmsnorm", "rope", "attention"], log=None)
    attention = report["passes"]["attention"]
    assert attention["fused"] == 0 and len(attention["near_misses"]) == LAYERS
    assert all(re.search(breaks, m["reason"]) for m in attention["near_misses"]), attention["near_misses"]
    assert report["passes"]["rmsnorm"]["fused"] == 2 * LAYERS + 1 and report["passes"]["rope"]["fused"] == 2 * LAYERS
