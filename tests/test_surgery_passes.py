"""Surgery passes on tiny hand-built graphs: each pattern fuses, and each broken assumption is refused."""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from kvplan import surgery
from kvplan.errors import GraphError, KvplanError

D, H, S = 8, 2, 5
F32, F16 = TP.FLOAT, TP.FLOAT16
NP = {F32: np.float32, F16: np.float16}


def const(name, value, dtype=np.float32):
    return nh.from_array(np.asarray(value, dtype=dtype), name)


def model(nodes, inputs, outputs, inits, opset=23):
    g = oh.make_graph(nodes, "g", inputs, outputs, inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", opset)])
    m.ir_version = 11 if opset >= 23 else 8
    onnx.checker.check_model(m, full_check=True)
    return m


# ---------------------------------------------------------------- RMSNorm graphs

def rms_model(dtype=F32, axes=(-1,), eps_input=False, cast_back=None, weight_shape=(D,), island=None,
              opset=23, rsqrt="reciprocal", weight_type=None):
    """Y = weight * [Cast](x32 * 1/sqrt(mean(x32^2) + eps)), x of shape [2, 3, D]."""
    npd = NP[dtype]
    island = dtype != F32 if island is None else island
    inputs = [oh.make_tensor_value_info("X", dtype, [2, 3, D])]
    w = np.linspace(0.5, 1.5, int(np.prod(weight_shape))).reshape(weight_shape)
    cdt = np.float32 if island else npd  # the type the norm computes in
    inits = [const("two", 2.0, cdt), oh.make_tensor("w", weight_type or dtype, list(weight_shape), w.reshape(-1).tolist())
             if weight_type == TP.BFLOAT16 else const("w", w, npd)]
    nodes = []
    x = "X"
    if island:
        nodes.append(oh.make_node("Cast", ["X"], ["x32"], "cast_in", to=F32))
        x = "x32"
    nodes.append(oh.make_node("Pow", [x, "two"], ["sq"], "pow"))
    if opset >= 18:
        inits.append(const("axes", list(axes), np.int64))
        nodes.append(oh.make_node("ReduceMean", ["sq", "axes"], ["ms"], "mean", keepdims=1))
    else:
        nodes.append(oh.make_node("ReduceMean", ["sq"], ["ms"], "mean", axes=list(axes), keepdims=1))
    if eps_input:
        inputs.append(oh.make_tensor_value_info("eps", F32, [1]))
    else:
        inits.append(const("eps", [1e-5], cdt))
    nodes.append(oh.make_node("Add", ["ms", "eps"], ["mse"], "add_eps"))
    nodes.append(oh.make_node("Sqrt", ["mse"], ["rms"], "sqrt"))
    if rsqrt == "reciprocal":
        nodes.append(oh.make_node("Reciprocal", ["rms"], ["inv"], "recip"))
    else:
        inits.append(const("one", 1.0))
        nodes.append(oh.make_node("Div", ["one", "rms"], ["inv"], "recip"))
    nodes.append(oh.make_node("Mul", [x, "inv"], ["n32"], "mul_norm"))
    n = "n32"
    back = cast_back if cast_back is not None else (dtype if island else None)
    if back is not None:
        nodes.append(oh.make_node("Cast", ["n32"], ["n"], "cast_out", to=back))
        n = "n"
    nodes.append(oh.make_node("Mul", ["w", n], ["Y"], "mul_weight"))
    out_type = back if back is not None else (F32 if island else dtype)
    return model(nodes, inputs, [oh.make_tensor_value_info("Y", out_type, [2, 3, D])], inits, opset)


def ops(m):
    return [n.op_type for n in m.graph.node]


def ort_run(m, feeds):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(None, feeds)


def test_rmsnorm_fp32_fuses_to_one_node_with_model_epsilon():
    m = rms_model()
    out, report = surgery.run(m, ["rmsnorm"], log=None)
    assert report["passes"]["rmsnorm"] == {"fused": 1, "near_misses": []}
    assert ops(out) == ["RMSNormalization"]
    node = out.graph.node[0]
    attrs = {a.name: oh.get_attribute_value(a) for a in node.attribute}
    assert attrs["axis"] == -1 and attrs["stash_type"] == 1
    assert attrs["epsilon"] == pytest.approx(1e-5)
    assert list(node.input) == ["X", "w"]
    x = np.random.default_rng(0).standard_normal((2, 3, D)).astype(np.float32)
    np.testing.assert_allclose(ort_run(out, {"X": x})[0], ort_run(m, {"X": x})[0], atol=1e-6)


def test_rmsnorm_fp16_cast_island_takes_fp16_input():
    m = rms_model(dtype=F16)
    out, report = surgery.run(m, ["rmsnorm"], log=None)
    assert report["passes"]["rmsnorm"]["fused"] == 1
    assert ops(out) == ["RMSNormalization"]
    assert list(out.graph.node[0].input) == ["X", "w"]
    x = np.random.default_rng(1).standard_normal((2, 3, D)).astype(np.float16)
    got, want = ort_run(out, {"X": x})[0], ort_run(m, {"X": x})[0]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=4e-3)


def test_rmsnorm_div_one_over_sqrt_spelling_fuses():
    out, report = surgery.run(rms_model(rsqrt="div"), ["rmsnorm"], log=None)
    assert report["passes"]["rmsnorm"]["fused"] == 1 and ops(out) == ["RMSNormalization"]


def test_rmsnorm_below_opset_23_is_raised_and_fused():
    m = rms_model(opset=17)
    out, report = surgery.run(m, ["rmsnorm"], log=None)
    assert report["passes"]["rmsnorm"]["fused"] == 1
    assert {o.domain: o.version for o in out.opset_import}[""] == 23
    assert ops(out) == ["RMSNormalization"]


def near_miss(report, name):
    misses = report["passes"][name]["near_misses"]
    assert report["passes"][name]["fused"] == 0
    assert len(misses) == 1, misses
    return misses[0]


def test_rmsnorm_wrong_reduce_axis_is_left_alone_and_reported():
    m = rms_model(axes=(1,))
    out, report = surgery.run(m, ["rmsnorm"], log=None)
    miss = near_miss(report, "rmsnorm")
    assert "axes [1]" in miss["reason"]
    assert {"pow", "mean"} <= set(miss["nodes"])
    assert ops(out) == ops(m)


def test_rmsnorm_epsilon_from_graph_input_is_refused():
    m = rms_model(eps_input=True)
    out, report = surgery.run(m, ["rmsnorm"], log=None)
    miss = near_miss(report, "rmsnorm")
    assert "epsilon" in miss["reason"] and "add_eps" in miss["nodes"]
    assert "RMSNormalization" not in ops(out)


def test_rmsnorm_cast_back_to_other_dtype_is_refused():
    # fp16 input cast to fp32, normalised, then cast to bfloat16: not the input dtype.
    m = rms_model(dtype=F16, cast_back=TP.BFLOAT16, weight_type=TP.BFLOAT16)
    out, report = surgery.run(m, ["rmsnorm"], log=None)
    miss = near_miss(report, "rmsnorm")
    assert "BFLOAT16" in miss["reason"] and "cast_out" in miss["nodes"]


def test_rmsnorm_weight_of_wrong_shape_is_refused():
    m = rms_model(weight_shape=(3, D))
    out, report = surgery.run(m, ["rmsnorm"], log=None)
    miss = near_miss(report, "rmsnorm")
    assert "weight shape [3, 8]" in miss["reason"] and "mul_weight" in miss["nodes"]


def test_rmsnorm_in_fp16_without_fp32_island_is_refused():
    m = rms_model(dtype=F16, island=False)
    out, report = surgery.run(m, ["rmsnorm"], log=None)
    assert "FLOAT16" in near_miss(report, "rmsnorm")["reason"]


# ---------------------------------------------------------------- RoPE graphs

def rope_model(dtype=F32, variant="ok"):
    """y = x * cos + rotate_half(x) * sin, x [1, H, S, D]; cos/sin from position_ids as kvplan spells them."""
    half = D // 2
    inv_freq = 1.0 / (10000 ** (np.arange(0, D, 2) / D))
    inits = [const("inv_freq", inv_freq[None, None, :]), const("ax2", [2], np.int64), const("ax1", [1], np.int64),
             const("axl", [-1], np.int64), const("c0", [0], np.int64), const("ch", [half], np.int64),
             const("cD", [2**63 - 1], np.int64), const("one", [1], np.int64), const("two", [2], np.int64)]
    nodes = [oh.make_node("Unsqueeze", ["position_ids", "ax2"], ["p3"], "unsq_pos"),
             oh.make_node("Cast", ["p3"], ["pf"], "cast_pos", to=F32),
             oh.make_node("Mul", ["pf", "inv_freq"], ["f"], "freqs")]
    if variant == "not_duplicated":
        inits.append(const("shift", 0.5))
        nodes += [oh.make_node("Add", ["f", "shift"], ["g"], "shifted"),
                  oh.make_node("Concat", ["f", "g"], ["emb"], "cat_emb", axis=-1)]
    else:
        nodes.append(oh.make_node("Concat", ["f", "f"], ["emb"], "cat_emb", axis=-1))
    for trig in ("Cos", "Sin"):
        t = trig.lower()
        nodes.append(oh.make_node(trig, ["emb"], [f"{t}32"], t))
        src = f"{t}32"
        if dtype != F32:
            nodes.append(oh.make_node("Cast", [src], [f"{t}_c"], f"cast_{t}", to=dtype))
            src = f"{t}_c"
        nodes.append(oh.make_node("Unsqueeze", [src, "ax1"], [f"{t}4"], f"unsq_{t}"))
    x = "x"
    hi_start, hi_end, lo_start, lo_end, step = "ch", "cD", "c0", "ch", "one"
    if variant == "wrong_half":
        hi_start, hi_end, lo_start, lo_end = "c0", "ch", "ch", "cD"
    if variant == "interleaved":
        hi_start, hi_end, lo_start, lo_end, step = "one", "cD", "c0", "cD", "two"
    if variant == "partial":
        # rotate the first D/2 dims only, pass the rest through
        inits += [const("cq", [half // 2], np.int64), const("cH", [half], np.int64)]
        nodes += [oh.make_node("Slice", ["x", "c0", "cH", "axl"], ["xr"], "split_rot"),
                  oh.make_node("Slice", ["x", "cH", "cD", "axl"], ["xp"], "split_pass")]
        x, hi_start, lo_end = "xr", "cq", "cq"
    nodes += [oh.make_node("Slice", [x, hi_start, hi_end, "axl", step], ["x2"], "slice_hi"),
              oh.make_node("Neg", ["x2"], ["nx2"], "neg"),
              oh.make_node("Slice", [x, lo_start, lo_end, "axl", step], ["x1"], "slice_lo")]
    cat_inputs = ["x1", "nx2"] if variant == "reversed" else ["nx2", "x1"]
    nodes += [oh.make_node("Concat", cat_inputs, ["rot"], "cat_rot", axis=-1),
              oh.make_node("Mul", [x, "cos4"], ["xc"], "mul_cos"),
              oh.make_node("Mul", ["rot", "sin4"], ["rs"], "mul_sin"),
              oh.make_node("Add", ["xc", "rs"], ["y" if variant != "partial" else "yr"], "add_rope")]
    if variant == "partial":
        nodes.append(oh.make_node("Concat", ["yr", "xp"], ["y"], "cat_partial", axis=-1))
    if variant == "partial":
        # cos/sin of the rotary dims only
        inits[0] = const("inv_freq", (1.0 / (10000 ** (np.arange(0, half, 2) / half)))[None, None, :])
    inputs = [oh.make_tensor_value_info("x", dtype, [1, H, "S", D]),
              oh.make_tensor_value_info("position_ids", TP.INT64, [1, "S"])]
    outputs = [oh.make_tensor_value_info("y", dtype, [1, H, "S", D])]
    return model(nodes, inputs, outputs, inits)


def rope_feeds(dtype=F32, start=3):
    x = np.random.default_rng(2).standard_normal((1, H, S, D)).astype(NP[dtype])
    return {"x": x, "position_ids": np.arange(start, start + S, dtype=np.int64)[None]}


@pytest.mark.parametrize("dtype,atol", [(F32, 1e-6), (F16, 4e-3)])
def test_rope_fuses_to_rotary_embedding_with_graph_cos_sin(dtype, atol):
    m = rope_model(dtype)
    out, report = surgery.run(m, ["rope"], log=None)
    assert report["passes"]["rope"] == {"fused": 1, "near_misses": []}
    names = ops(out)
    assert names.count("RotaryEmbedding") == 1 and "Neg" not in names
    rope = next(n for n in out.graph.node if n.op_type == "RotaryEmbedding")
    assert len(rope.input) == 3  # no position_ids: the caches are per token already
    assert {a.name: oh.get_attribute_value(a) for a in rope.attribute}["interleaved"] == 0
    feeds = rope_feeds(dtype)
    got, want = ort_run(out, feeds)[0], ort_run(m, feeds)[0]
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=atol)


@pytest.mark.parametrize("variant,reason,node", [
    ("wrong_half", "first half is negated", "neg"),
    ("reversed", "reversed-sign", "cat_rot"),
    ("interleaved", "interleaved", "slice_hi"),
    ("not_duplicated", "Concat(f, f)", "mul_sin"),
    ("partial", "partial rotary", "split_rot"),
])
def test_rope_variant_is_left_alone_and_reported(variant, reason, node):
    m = rope_model(variant=variant)
    out, report = surgery.run(m, ["rope"], log=None)
    miss = near_miss(report, "rope")
    assert reason in miss["reason"]
    assert node in miss["nodes"]
    assert "RotaryEmbedding" not in ops(out)
    feeds = rope_feeds()
    np.testing.assert_allclose(ort_run(out, feeds)[0], ort_run(m, feeds)[0], atol=1e-6)


# ---------------------------------------------------------------- framework and API

def test_registry_lists_passes_in_order():
    assert list(surgery.PASSES) == ["rmsnorm", "rope", "attention", "gqa", "residual2d"]


def test_unknown_pass_name_is_a_user_error_naming_it_and_the_known_ones():
    with pytest.raises(KvplanError, match=r"'fuse_all'.*rmsnorm, rope"):
        surgery.run(rms_model(), ["rmsnorm", "fuse_all"], log=None)


def test_empty_pass_list_leaves_graph_unchanged():
    m = rms_model(opset=17)
    out, report = surgery.run(m, [], log=None)
    assert ops(out) == ops(m)
    assert report["passes"] == {}
    assert {o.domain: o.version for o in out.opset_import}[""] == 17


def test_report_is_json_serialisable_with_op_counts():
    _, report = surgery.run(rms_model(), ["rmsnorm", "rope"], log=None)
    again = json.loads(json.dumps(report))
    assert again["nodes_before"] == 7 and again["nodes_after"] == 1
    assert again["ops_before"]["Pow"] == 1 and again["ops_after"] == {"RMSNormalization": 1}
    assert set(again["passes"]) == {"rmsnorm", "rope"} and again["seconds"] >= 0


def test_fuse_file_writes_atomically_and_returns_report(tmp_path):
    src, dst = tmp_path / "in.onnx", tmp_path / "out" / "fused.onnx"
    onnx.save(rms_model(), src)
    report = surgery.fuse_file(src, dst, ["rmsnorm"], log=None)
    assert report["passes"]["rmsnorm"]["fused"] == 1
    assert ops(onnx.load(dst)) == ["RMSNormalization"]
    assert sorted(p.name for p in dst.parent.iterdir()) == ["fused.onnx"]


def test_fuse_file_missing_input_is_a_clear_error(tmp_path):
    with pytest.raises(GraphError, match="nope.onnx: no such ONNX file"):
        surgery.fuse_file(tmp_path / "nope.onnx", tmp_path / "out.onnx", ["rmsnorm"], log=None)
