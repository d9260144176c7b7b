"""The attention pass: hand-built graphs (fuses / refuses with node names), kvplan exports (one
Attention per layer, ONNX Runtime parity incl. masked slots, TensorRT-RTX parse and engine build)."""
from __future__ import annotations

import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh
from onnx import numpy_helper as nh

from kvplan import surgery
from kvplan.export.exporter import TORCH_DTYPES, causal_mask, example_inputs, input_names
from kvplan.models import resolve

F32, F16 = TP.FLOAT, TP.FLOAT16
NP = {F32: np.float32, F16: np.float16}
B, N, S, D = 1, 3, 5, 16


def ops(m):
    return [n.op_type for n in m.graph.node]


def attrs_of(node):
    return {a.name: oh.get_attribute_value(a) for a in node.attribute}


def ort_session(m):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = m.SerializeToString() if isinstance(m, onnx.ModelProto) else str(m)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


# ---------------------------------------------------------------- hand-built graphs

def attn_model(dtype=F32, heads=2, kv=2, variant="ok", scale=D ** -0.5, island=None):
    """y = Reshape(Transpose(softmax(q k^T * scale + mask) v)), the kvplan spelling, with one broken assumption."""
    npd = NP[dtype]
    island = dtype != F32 if island is None else island
    rep = heads // kv
    inits = [nh.from_array(np.array([B, N, heads * D], np.int64), "out_shape")]
    inputs = [oh.make_tensor_value_info("q", dtype, [B, heads, N, D]),
              oh.make_tensor_value_info("k", dtype, [B, kv, S, D]),
              oh.make_tensor_value_info("v", dtype, [B, kv, S, D]),
              oh.make_tensor_value_info("mask", dtype, [B, 1, N, S])]
    nodes = []
    k4, v4 = "k", "v"
    if rep > 1:
        inits += [nh.from_array(np.array([2], np.int64), "ax2"), nh.from_array(np.array([1], np.int64), "ax1"),
                  nh.from_array(np.array([B, kv, rep, S, D], np.int64), "exp_shape"),
                  nh.from_array(np.array([B, rep, kv, S, D], np.int64), "exp_shape_t"),
                  nh.from_array(np.array([B, heads, -1, D], np.int64), "rep_shape"),
                  nh.from_array(np.array([1, rep, 1, 1], np.int64), "tile_reps")]
        for t in ("k", "v"):
            if variant == "tile":
                nodes.append(oh.make_node("Tile", [t, "tile_reps"], [f"{t}4"], f"tile_{t}"))
            elif variant == "repeat_axis1":
                nodes += [oh.make_node("Unsqueeze", [t, "ax1"], [f"{t}5"], f"unsq_{t}"),
                          oh.make_node("Expand", [f"{t}5", "exp_shape_t"], [f"{t}e"], f"expand_{t}"),
                          oh.make_node("Reshape", [f"{t}e", "rep_shape"], [f"{t}4"], f"reshape_{t}")]
            else:
                nodes += [oh.make_node("Unsqueeze", [t, "ax2"], [f"{t}5"], f"unsq_{t}"),
                          oh.make_node("Expand", [f"{t}5", "exp_shape"], [f"{t}e"], f"expand_{t}"),
                          oh.make_node("Reshape", [f"{t}e", "rep_shape"], [f"{t}4"], f"reshape_{t}")]
        k4, v4 = "k4", "v4"
    nodes += [oh.make_node("Transpose", [k4], ["kt"], "transpose_k", perm=[0, 1, 3, 2]),
              oh.make_node("MatMul", ["q", "kt"], ["qk"], "matmul_qk")]
    if variant == "scale_input":
        inputs.append(oh.make_tensor_value_info("scale", dtype, []))
    elif variant == "scale_per_head":
        inits.append(nh.from_array(np.linspace(0.2, 0.3, heads).reshape(1, heads, 1, 1).astype(npd), "scale"))
    elif variant == "div":
        inits.append(nh.from_array(np.array(1.0 / scale, npd), "scale"))
    else:
        inits.append(nh.from_array(np.array(scale, npd), "scale"))
    scale_op = "Div" if variant == "div" else "Mul"
    if variant == "mask_first":
        nodes += [oh.make_node("Add", ["qk", "mask"], ["qkm"], "add_mask"),
                  oh.make_node("Mul", ["qkm", "scale"], ["scores"], "mul_scale")]
    else:
        nodes += [oh.make_node(scale_op, ["qk", "scale"], ["qks"], "mul_scale"),
                  oh.make_node("Add", ["qks", "mask"], ["scores"], "add_mask")]
    axis = 2 if variant == "axis" else -1
    if island:
        nodes += [oh.make_node("Cast", ["scores"], ["s32"], "cast_in", to=F32),
                  oh.make_node("Softmax", ["s32"], ["p32"], "softmax", axis=axis),
                  oh.make_node("Cast", ["p32"], ["probs"], "cast_out", to=dtype)]
    else:
        nodes.append(oh.make_node("Softmax", ["scores"], ["probs"], "softmax", axis=axis))
    nodes += [oh.make_node("MatMul", ["probs", v4], ["pv"], "matmul_pv"),
              oh.make_node("Transpose", ["pv"], ["pvt"], "transpose_out", perm=[0, 2, 1, 3]),
              oh.make_node("Reshape", ["pvt", "out_shape"], ["y"], "reshape_out")]
    g = oh.make_graph(nodes, "g", inputs, [oh.make_tensor_value_info("y", dtype, [B, N, heads * D])], inits)
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)])
    m.ir_version = 11
    onnx.checker.check_model(m, full_check=True)
    return m


def attn_feeds(dtype=F32, heads=2, kv=2, masked=True, with_scale=False):
    rng = np.random.default_rng(3)
    npd = NP[dtype]
    f = {"q": rng.standard_normal((B, heads, N, D)), "k": rng.standard_normal((B, kv, S, D)),
         "v": rng.standard_normal((B, kv, S, D))}
    f = {k: v.astype(npd) for k, v in f.items()}
    mask = np.zeros((B, 1, N, S), npd)
    if masked:
        mask[..., 1] = np.finfo(npd).min  # a masked slot in every row
        mask[0, 0, 0, 3:] = np.finfo(npd).min
    f["mask"] = mask
    if with_scale:
        f["scale"] = np.array(D ** -0.5, npd)
    return f


def near_miss(report):
    p = report["passes"]["attention"]
    assert p["fused"] == 0
    assert len(p["near_misses"]) == 1, p["near_misses"]
    return p["near_misses"][0]


def attention_node(m):
    (node,) = [n for n in m.graph.node if n.op_type == "Attention"]
    return node


@pytest.mark.parametrize("dtype,heads,kv,island", [
    (F32, 2, 2, False), (F32, 4, 2, False), (F32, 4, 1, False),
    (F16, 4, 2, True), (F16, 2, 2, False),
], ids=["fp32-mha", "fp32-gqa", "fp32-mqa", "fp16-gqa-fp32-softmax", "fp16-mha-fp16-softmax"])
def test_attention_fuses_to_one_node(dtype, heads, kv, island):
    m = attn_model(dtype, heads, kv, island=island)
    out, report = surgery.run(m, ["attention"], log=None)
    assert report["passes"]["attention"] == {"fused": 1, "near_misses": []}
    assert ops(out) == ["Attention", "Transpose", "Reshape"]
    node = attention_node(out)
    assert list(node.input) == ["q", "k", "v", "mask"]  # K/V with their own KV heads: no repetition left
    assert list(node.output) == ["pv"]
    a = attrs_of(node)
    assert a["scale"] == pytest.approx(float(NP[dtype](D ** -0.5)))
    assert a["is_causal"] == 0
    # Never written: TensorRT's parser refuses it, and both runtimes keep the softmax in fp32 anyway.
    assert "softmax_precision" not in a
    feeds = attn_feeds(dtype, heads, kv)
    got, want = ort_session(out).run(None, feeds)[0], ort_session(m).run(None, feeds)[0]
    assert got.dtype == want.dtype
    # fp16: Attention scales Q and K by sqrt(scale) in fp16 (exact here: sqrt(1/4) = 1/2) and ORT's
    # kernel keeps the softmax in fp32; outputs |y| < 3, so an fp16 ulp is <= 2**-10.
    atol = 1e-5 if dtype == F32 else 2e-3
    np.testing.assert_allclose(got.astype(np.float32), want.astype(np.float32), atol=atol)


@pytest.mark.parametrize("variant,scale", [("ok", 0.1), ("div", 0.1)], ids=["mul", "div"])
def test_non_default_scalar_scale_is_written_explicitly(variant, scale):
    m = attn_model(F32, 4, 2, variant=variant, scale=scale)
    out, report = surgery.run(m, ["attention"], log=None)
    assert report["passes"]["attention"]["fused"] == 1
    assert attrs_of(attention_node(out))["scale"] == pytest.approx(scale, rel=1e-6)
    feeds = attn_feeds(F32, 4, 2)
    np.testing.assert_allclose(ort_session(out).run(None, feeds)[0], ort_session(m).run(None, feeds)[0], atol=1e-5)


@pytest.mark.parametrize("variant,heads,kv,reason,node", [
    ("axis", 2, 2, "axis 2, not the last axis", "softmax"),
    ("scale_input", 2, 2, "not a constant", "mul_scale"),
    ("scale_per_head", 2, 2, "has shape [1, 2, 1, 1], not one value", "mul_scale"),
    ("mask_first", 2, 2, "mask is added before scaling", "add_mask"),
    ("tile", 4, 2, "tile-style", "tile_k"),
    ("repeat_axis1", 4, 2, "tile-style", "unsq_k"),
])
def test_broken_assumption_is_left_alone_and_reported(variant, heads, kv, reason, node):
    m = attn_model(F32, heads, kv, variant=variant)
    out, report = surgery.run(m, ["attention"], log=None)
    miss = near_miss(report)
    assert reason in miss["reason"], miss
    assert node in miss["nodes"] and "softmax" in miss["nodes"], miss
    assert "Attention" not in ops(out) and "Softmax" in ops(out)
    feeds = attn_feeds(F32, heads, kv, with_scale=variant == "scale_input")
    np.testing.assert_allclose(ort_session(out).run(None, feeds)[0], ort_session(m).run(None, feeds)[0], atol=1e-6)


def test_softmax_outside_attention_is_not_a_candidate():
    g = oh.make_graph([oh.make_node("Softmax", ["x"], ["y"], "softmax", axis=-1)], "g",
                      [oh.make_tensor_value_info("x", F32, [2, 3])], [oh.make_tensor_value_info("y", F32, [2, 3])])
    m = oh.make_model(g, opset_imports=[oh.make_opsetid("", 23)])
    m.ir_version = 11
    _, report = surgery.run(m, ["attention"], log=None)
    assert report["passes"]["attention"] == {"fused": 0, "near_misses": []}


def test_registry_runs_attention_after_rope():
    names = list(surgery.PASSES)
    assert names.index("attention") == names.index("rope") + 1


# ---------------------------------------------------------------- kvplan exports

# (preset, dtype, kv_format, pack size, passes before attention): fp32 and fp16, both KV layouts,
# GQA (tiny-*: 4 q / 2 kv heads), with and without the rmsnorm/rope passes, packs of 2 layers.
CASES = [
    ("tiny-llama", "float32", 0, 0, ()),
    ("tiny-llama", "float16", 1, 0, ("rmsnorm", "rope")),
    ("tiny-qwen2", "float16", 0, 0, ("rmsnorm", "rope")),
    ("tiny-qwen3", "float32", 0, 0, ("rmsnorm", "rope")),
    ("tiny-llama", "float32", 1, 2, ("rope",)),
]
IDS = [f"{p}-{d}-kv{k}-p{s}-{'+'.join(b) or 'alone'}" for p, d, k, s, b in CASES]
SHAPES = [(8, 0), (1, 302), (10, 303)]
# The reference is the same graph with the same passes except attention, so the difference is the
# attention fusion alone. fp32: the same math in another order (measured 0 .. 3e-7). fp16: the
# exported graph runs Softmax in fp16 while ONNX Runtime's CPU Attention kernel keeps scores and
# softmax in fp32 and rounds once at the output (softmax_precision has no effect on it), so each
# layer's attention output may differ by an fp16 ulp or two; |hidden| < 8 (ulp <= 2**-8), four
# layers, residual adds: measured <= 0.002, 1e-2 allows a few ulps while a wrong scale, mask or
# head grouping shows up as differences of order 0.1 .. 1.
ATOL = {"float32": 1e-4, "float16": 1e-2}


@pytest.fixture(scope="session")
def fused_attention(export_tiny, tmp_path_factory):
    """fused_attention(case) -> [(pack, reference path, fused path, report)], once per session."""
    cache = {}

    def get(case):
        if case not in cache:
            preset, dtype, kv_format, pack_size, before = case
            out = tmp_path_factory.mktemp(f"attn-{preset}-{dtype}-kv{kv_format}-p{pack_size}")
            done = []
            for i, pack in enumerate(export_tiny(preset, dtype, kv_format, pack_size)):
                ref = pack.path
                if before:
                    ref = out / f"ref{i}.onnx"
                    surgery.fuse_file(pack.path, ref, before, log=None)
                fused = out / f"fused{i}.onnx"
                report = surgery.fuse_file(pack.path, fused, [*before, "attention"], log=None)
                done.append((pack, ref, fused, report))
            cache[case] = done
        return cache[case]

    return get


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_one_attention_per_layer(fused_attention, case):
    packs = fused_attention(case)
    assert len(packs) == (2 if case[3] == 2 else 1)
    for pack, _, path, report in packs:
        layers = len(pack.spec.layers)
        assert layers == (2 if case[3] == 2 else 4)
        assert report["passes"]["attention"] == {"fused": layers, "near_misses": []}
        counts = report["ops_after"]
        assert counts["Attention"] == layers and "Softmax" not in counts
        assert "Expand" not in counts  # the GQA repetition went with the pattern
        for node in onnx.load(path).graph.node:
            if node.op_type == "Attention":
                a = attrs_of(node)
                assert len(node.output) == 1 and len(node.input) == 4
                assert a["is_causal"] == 0 and "softmax_precision" not in a  # exports run softmax in Q's type
                assert a["scale"] == pytest.approx(resolve(case[0]).config.head_dim ** -0.5)


def masked_slots(mask: torch.Tensor, last: int) -> torch.Tensor:
    """MiniCPM-o streaming TTS: reserved past slots not filled yet are masked for every query."""
    mask = mask.clone()
    lo, hi = min(2, last), min(40, last)
    mask[..., lo:hi] = torch.finfo(mask.dtype).min
    return mask


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_onnxruntime_fused_attention_matches_unfused(fused_attention, case):
    preset, dtype, *_ = case
    cfg = resolve(preset).config
    tdt = TORCH_DTYPES[dtype]
    for pack, ref_path, path, _ in fused_attention(case):
        ref, fused = ort_session(ref_path), ort_session(path)
        runs = [(n, last, False) for n, last in SHAPES] + [(1, 302, True), (10, 303, True)]
        for n, last, masked in runs:
            args = list(example_inputs(cfg, pack.spec, 1, tdt, n, last))
            if masked:
                args[1] = masked_slots(causal_mask(1, n, last, tdt), last)
            feeds = {k: v.numpy() for k, v in zip(input_names(pack.spec), args)}
            want, got = ref.run(None, feeds), fused.run(None, feeds)
            for w, g in zip(want, got):
                assert g.dtype == w.dtype and g.shape == w.shape
                assert np.isfinite(g.astype(np.float32)).all()
                diff = float(np.abs(g.astype(np.float32) - w.astype(np.float32)).max())
                assert diff <= ATOL[dtype], f"(N, lastSum, masked)=({n}, {last}, {masked}): max abs diff {diff}"


def trt_network(trt, path):
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse_from_file(str(path))
    return builder, network, ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]


def small_profile(builder, network, n=(1, 4, 8), last=(0, 8, 16)):
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        t = network.get_input(i)

        def dims(j, t=t):
            out = []
            for axis, d in enumerate(t.shape):
                if d >= 0:
                    out.append(d)
                elif t.name in ("hidden_in", "position_ids") or (t.name == "attention_mask" and axis == 2):
                    out.append(n[j])
                elif t.name == "attention_mask":
                    out.append(n[j] + last[j])
                else:
                    out.append(last[j])
            return out
        profile.set_shape(t.name, dims(0), dims(1), dims(2))
    return profile


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_tensorrt_rtx_builds_attention_layers(fused_attention, case):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
    pack, _, path, report = fused_attention(case)[0]
    builder, network, ok, errors = trt_network(trt, path)
    assert ok, errors
    types = [network.get_layer(i).type for i in range(network.num_layers)]
    fused = report["passes"]["attention"]["fused"]
    # One IAttention per fused node, seen as its two boundary layers.
    assert types.count(trt.LayerType.ATTENTION_INPUT) == fused
    assert types.count(trt.LayerType.ATTENTION_OUTPUT) == fused
    assert trt.LayerType.SOFTMAX not in types
    if case[1] == "float32":
        # TensorRT-RTX 1.7 has no dedicated fp32 attention kernel and the parser marks the layer
        # non-decomposable ("Attention operation was not supported by a dedicated kernel"): the
        # builder must allow decomposition for fp32 engines.
        for i in range(network.num_layers):
            layer = network.get_layer(i)
            if layer.type == trt.LayerType.ATTENTION_INPUT:
                layer.__class__ = trt.IAttentionInputLayer
                layer.attention.decomposable = True
    config = builder.create_builder_config()
    config.add_optimization_profile(small_profile(builder, network))
    t0 = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    assert plan is not None and plan.nbytes > 0, f"engine build failed after {time.perf_counter() - t0:.1f} s"


def test_fp32_island_fuses_into_a_graph_tensorrt_accepts(tmp_path):
    """The island is fused without softmax_precision, which TensorRT-RTX's parser refuses (pinned
    below by adding it back by hand): if the second half starts failing, TensorRT accepts it now."""
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
    out, _ = surgery.run(attn_model(F16, 4, 2, island=True), ["attention"], log=None)
    path = tmp_path / "island.onnx"
    onnx.save(out, path)
    _, _, ok, errors = trt_network(trt, path)
    assert ok, errors
    [node] = [n for n in out.graph.node if n.op_type == "Attention"]
    node.attribute.append(onnx.helper.make_attribute("softmax_precision", F32))
    onnx.save(out, path)
    _, _, ok, errors = trt_network(trt, path)
    assert not ok and any("softmax precision is not supported" in e for e in errors), errors
