"""The gqa pass on tiny hand-built graphs: a grouped-query Attention becomes attention over the kv heads
with the same outputs (to fp32 rounding); attention without groups, a causal one or a per-head mask is left alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

from kvplan import surgery

D = 8


def attention_graph(q_heads=4, kv_heads=2, mask=(1, 1, "N", "S"), is_causal=0, layers=1):
    """``layers`` Attention nodes over Q [B, q_heads, N, D] and K/V [B, kv_heads, S, D], one mask."""
    inputs = [oh.make_tensor_value_info("Q", TP.FLOAT, ["B", q_heads, "N", D]),
              oh.make_tensor_value_info("K", TP.FLOAT, ["B", kv_heads, "S", D]),
              oh.make_tensor_value_info("V", TP.FLOAT, ["B", kv_heads, "S", D])]
    if mask is not None:
        inputs.append(oh.make_tensor_value_info("mask", TP.FLOAT, list(mask)))
    nodes, outputs, q = [], [], "Q"
    for i in range(layers):
        nodes.append(oh.make_node("Attention", [q, "K", "V"] + (["mask"] if mask is not None else []), [f"Y{i}"],
                                  f"attention{i}", scale=0.3, is_causal=is_causal))
        outputs.append(oh.make_tensor_value_info(f"Y{i}", TP.FLOAT, ["B", q_heads, "N", D]))
        q = f"Y{i}"
    m = oh.make_model(oh.make_graph(nodes, "g", inputs, outputs), opset_imports=[oh.make_opsetid("", 23)])
    m.ir_version = 11
    onnx.checker.check_model(m, full_check=True)
    return m


def feeds(b, n, s, q_heads=4, kv_heads=2, mask_heads=1, mask=True):
    rng = np.random.default_rng(b * 100 + n * 10 + s)
    f = {"Q": rng.standard_normal((b, q_heads, n, D)).astype(np.float32),
         "K": rng.standard_normal((b, kv_heads, s, D)).astype(np.float32),
         "V": rng.standard_normal((b, kv_heads, s, D)).astype(np.float32)}
    if mask:
        f["mask"] = np.where(rng.random((1, mask_heads, n, s)) < 0.3, -1e4, 0.0).astype(np.float32)
    return f


def same(got, want):
    # The same arithmetic; a kernel blocking rep*N rows at once may sum in another order (fp32 ulps).
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def run(m, f):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, f)


def ops(m):
    return [n.op_type for n in m.graph.node]


def test_grouped_query_attention_runs_over_the_kv_heads_with_the_same_outputs():
    m = attention_graph()
    out, report = surgery.run(m, ["gqa"], log=None)
    assert report["passes"]["gqa"] == {"fused": 1, "near_misses": []}
    attention = next(n for n in out.graph.node if n.op_type == "Attention")
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert producers[attention.input[0]] == "Reshape" and producers[attention.input[3]] == "Reshape"
    assert attention.input[1:3] == ["K", "V"]
    for b, n, s in [(1, 1, 5), (2, 3, 7), (1, 6, 6)]:
        f = feeds(b, n, s)
        same(run(out, f)[0], run(m, f)[0])


def test_without_a_mask_the_attention_is_regrouped_alone():
    m = attention_graph(mask=None)
    out, report = surgery.run(m, ["gqa"], log=None)
    assert report["passes"]["gqa"]["fused"] == 1 and "Expand" not in ops(out)
    f = feeds(2, 3, 4, mask=False)
    same(run(out, f)[0], run(m, f)[0])


def test_layers_sharing_a_mask_share_one_tiled_mask():
    m = attention_graph(layers=3)
    out, report = surgery.run(m, ["gqa"], log=None)
    assert report["passes"]["gqa"]["fused"] == 3 and ops(out).count("Expand") == 1
    f = feeds(1, 4, 9)
    for got, want in zip(run(out, f), run(m, f)):
        same(got, want)


def test_attention_with_as_many_kv_heads_as_query_heads_is_not_a_candidate():
    m = attention_graph(q_heads=2, kv_heads=2)
    out, report = surgery.run(m, ["gqa"], log=None)
    assert report["passes"]["gqa"] == {"fused": 0, "near_misses": []}
    assert ops(out) == ops(m)


@pytest.mark.parametrize("variant,reason", [
    (dict(is_causal=1), "is causal"),
    (dict(mask=(1, 4, "N", "S")), "not one [B or 1, 1, N, S] mask for every head"),
])
def test_a_causal_attention_or_a_per_head_mask_is_left_alone_and_reported(variant, reason):
    m = attention_graph(**variant)
    out, report = surgery.run(m, ["gqa"], log=None)
    misses = report["passes"]["gqa"]["near_misses"]
    assert report["passes"]["gqa"]["fused"] == 0 and len(misses) == 1
    assert reason in misses[0]["reason"] and misses[0]["nodes"] == ["attention0"]
    assert ops(out) == ops(m)
