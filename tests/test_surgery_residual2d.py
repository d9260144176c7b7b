"""The residual2d pass on tiny hand-built graphs: an int4 linear added to a residual runs on 2-D views,
computing the same numbers; float linears, broadcasting adds and shared linear outputs are left alone."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from kvplan import surgery

K, H, GROUP = 16, 8, 8


def linear_add(weight="int4", residual_first=False, residual_shape=("B", "N", H), extra_reader=False, x_rank=3,
               dtype=TP.FLOAT):
    """Y = Add(MatMul(X, W), R) with W = DequantizeLinear(int4 q, scale) (or a float initializer)."""
    rng = np.random.default_rng(0)
    npd = np.float32 if dtype == TP.FLOAT else np.float16
    x_shape = ["B", "N", K] if x_rank == 3 else ["T", K]
    y_shape = x_shape[:-1] + [H]
    inputs = [oh.make_tensor_value_info("X", dtype, x_shape),
              oh.make_tensor_value_info("R", dtype, list(residual_shape) if x_rank == 3 else ["T", H])]
    nodes, inits = [], []
    if weight == "int4":
        q = rng.integers(-8, 8, (K, H))
        inits += [oh.make_tensor("q", TP.INT4, [K, H], q.reshape(-1).tolist()),
                  nh.from_array((rng.random((K // GROUP, H)) * 0.1 + 0.01).astype(npd), "scale")]
        nodes.append(oh.make_node("DequantizeLinear", ["q", "scale"], ["W"], "dq", axis=0, block_size=GROUP))
    else:
        inits.append(nh.from_array(rng.standard_normal((K, H)).astype(npd), "W"))
    nodes.append(oh.make_node("MatMul", ["X", "W"], ["lin"], "matmul"))
    nodes.append(oh.make_node("Add", ["R", "lin"] if residual_first else ["lin", "R"], ["Y"], "add"))
    outputs = [oh.make_tensor_value_info("Y", dtype, y_shape)]
    if extra_reader:
        nodes.append(oh.make_node("Neg", ["lin"], ["Z"], "neg"))
        outputs.append(oh.make_tensor_value_info("Z", dtype, y_shape))
    g = oh.make_graph(nodes, "g", inputs, outputs, inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)])
    m.ir_version = 11
    onnx.checker.check_model(m, full_check=True)
    return m


def run(m, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def feeds(b, n, dtype=np.float32):
    rng = np.random.default_rng(b * 10 + n)
    return {"X": rng.standard_normal((b, n, K)).astype(dtype), "R": rng.standard_normal((b, n, H)).astype(dtype)}


def ops(m):
    return [n.op_type for n in m.graph.node]


def test_int4_linear_and_residual_add_run_on_2d_views_with_the_same_numbers():
    m = linear_add()
    out, report = surgery.run(m, ["residual2d"], log=None)
    assert report["passes"]["residual2d"] == {"fused": 1, "near_misses": []}
    assert sorted(ops(out)) == sorted(["DequantizeLinear", "Reshape", "Reshape", "MatMul", "Add", "Shape", "Reshape"])
    matmul = next(n for n in out.graph.node if n.op_type == "MatMul")
    assert matmul.name == "matmul" and matmul.input[1] == "W"
    for b, n in [(1, 1), (2, 3), (3, 7)]:
        f = feeds(b, n)
        got, want = run(out, f)[0], run(m, f)[0]
        assert got.shape == (b, n, H)
        np.testing.assert_array_equal(got, want)


def test_graph_inputs_and_outputs_keep_their_names_and_symbolic_dims():
    out, _ = surgery.run(linear_add(), ["residual2d"], log=None)
    dims = [d.dim_param or d.dim_value for d in out.graph.output[0].type.tensor_type.shape.dim]
    assert out.graph.output[0].name == "Y" and dims == ["B", "N", H]


def test_the_adds_operand_order_is_kept():
    out, report = surgery.run(linear_add(residual_first=True), ["residual2d"], log=None)
    assert report["passes"]["residual2d"]["fused"] == 1
    add = next(n for n in out.graph.node if n.op_type == "Add")
    producers = {o: n.op_type for n in out.graph.node for o in n.output}
    assert [producers[i] for i in add.input] == ["Reshape", "MatMul"]
    f = feeds(2, 3)
    np.testing.assert_array_equal(run(out, f)[0], run(linear_add(residual_first=True), f)[0])


def test_fp16_activations_match_to_fp16_rounding():
    m = linear_add(dtype=TP.FLOAT16)
    out, report = surgery.run(m, ["residual2d"], log=None)
    assert report["passes"]["residual2d"]["fused"] == 1
    f = feeds(2, 5, np.float16)
    got, want = run(out, f)[0].astype(np.float32), run(m, f)[0].astype(np.float32)
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


def test_a_float_weight_linear_is_not_a_candidate():
    m = linear_add(weight="float")
    out, report = surgery.run(m, ["residual2d"], log=None)
    assert report["passes"]["residual2d"] == {"fused": 0, "near_misses": []}
    assert ops(out) == ops(m)


def test_an_int4_linear_plus_its_zero_point_product_is_not_a_candidate():
    # x @ (s * q) + x @ m: one linear with a zero point (a GGUF file's Q4_1 blocks), not a residual.
    m = linear_add()
    m.graph.initializer.append(nh.from_array(np.ones((K, H), np.float32), "M"))
    m.graph.node.insert(1, oh.make_node("MatMul", ["X", "M"], ["zp"], "zero_point"))
    add = next(n for n in m.graph.node if n.op_type == "Add")
    add.input[1] = "zp"
    del m.graph.input[1]
    out, report = surgery.run(m, ["residual2d"], log=None)
    assert report["passes"]["residual2d"] == {"fused": 0, "near_misses": []}
    assert ops(out) == ops(m)


def test_an_already_2d_linear_is_not_a_candidate():
    m = linear_add(x_rank=2)
    out, report = surgery.run(m, ["residual2d"], log=None)
    assert report["passes"]["residual2d"] == {"fused": 0, "near_misses": []}
    assert ops(out) == ops(m)


@pytest.mark.parametrize("variant,reason", [
    (dict(residual_shape=(1, 1, H)), "would broadcast"),
    (dict(extra_reader=True), "the linear's output (lin) is used outside the residual add"),
])
def test_a_broadcasting_add_or_a_shared_linear_output_is_left_alone_and_reported(variant, reason):
    m = linear_add(**variant)
    out, report = surgery.run(m, ["residual2d"], log=None)
    misses = report["passes"]["residual2d"]["near_misses"]
    assert report["passes"]["residual2d"]["fused"] == 0 and len(misses) == 1
    assert reason in misses[0]["reason"] and {"matmul", "add"} <= set(misses[0]["nodes"])
    assert ops(out) == ops(m)
