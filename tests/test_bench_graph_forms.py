"""The bench's attention-written-out graph form computes what the Attention it replaces does, so the
plan bytes bench.weight_copies records for it are those of the same model."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto as TP
from onnx import helper as oh

from bench._graph_forms import attention_decomposed

H, D = 3, 8


def attention_model():
    inputs = [oh.make_tensor_value_info(n, TP.FLOAT, ["B", H, dim, D]) for n, dim in (("Q", "N"), ("K", "S"), ("V", "S"))]
    inputs.append(oh.make_tensor_value_info("attention_mask", TP.FLOAT, ["B", 1, "N", "S"]))
    node = oh.make_node("Attention", ["Q", "K", "V", "attention_mask"], ["Y"], "layers.0/Attention", scale=0.3, is_causal=0)
    graph = oh.make_graph([node], "g", inputs, [oh.make_tensor_value_info("Y", TP.FLOAT, ["B", H, "N", D])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 23)])
    model.ir_version = 11
    return model


def run(model, feeds):
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_attention_written_out_gives_the_attention_outputs():
    rng = np.random.default_rng(0)
    n, s = 4, 7
    feeds = {"Q": rng.standard_normal((2, H, n, D)), "K": rng.standard_normal((2, H, s, D)),
             "V": rng.standard_normal((2, H, s, D)),
             "attention_mask": np.where(np.arange(s)[None, :] <= np.arange(n)[:, None] + s - n, 0.0, -1e4)[None, None]
             .repeat(2, axis=0)}
    feeds = {k: v.astype(np.float32) for k, v in feeds.items()}
    model = attention_model()
    expected = run(model, feeds)
    attention_decomposed(model)
    onnx.checker.check_model(model, full_check=True)
    assert "Attention" not in {n.op_type for n in model.graph.node}
    np.testing.assert_allclose(run(model, feeds), expected, rtol=1e-5, atol=1e-5)
