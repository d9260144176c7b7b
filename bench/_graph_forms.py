"""Rewrites of a fused decoder graph that bench.weight_copies builds beside the graph as shipped,
to see which graph forms change the kernel source TensorRT-RTX stores in a plan.

Each rewrite keeps the model's function (up to rounding) and changes one thing about how the
residual adds and the norms after them, or the attention's inputs, are spelled. The residual adds are the Add nodes with a
MatMul's output as an operand (o_proj's and down_proj's outputs added to the residual stream).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _producers(graph) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output}


def _residual_adds(graph) -> list[onnx.NodeProto]:
    made = _producers(graph)
    return [n for n in graph.node if n.op_type == "Add"
            and any(made.get(i) is not None and made[i].op_type == "MatMul" for i in n.input)]


def _initializers(graph) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in graph.initializer}


def fp16_o_down(model) -> None:
    """o_proj's and down_proj's DequantizeLinear replaced by their float16 values (int4 graphs)."""
    init = _initializers(model.graph)
    for node in [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                 and any(f"{name}." in n.input[0] for name in ("o_proj", "down_proj"))]:
        q = numpy_helper.to_array(init[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(init[node.input[1]]).astype(np.float32)
        weight = q * np.repeat(scale, q.shape[0] // scale.shape[0], axis=0)
        model.graph.initializer.append(numpy_helper.from_array(weight.astype(np.float16), node.output[0]))
        model.graph.node.remove(node)


def swap_add(model) -> None:
    """The residual adds' operands in the other order."""
    for node in _residual_adds(model.graph):
        node.input[0], node.input[1] = node.input[1], node.input[0]


def norm_weight_1(model) -> None:
    """Every RMSNormalization's scale set to ones (the same constant in every layer)."""
    init = _initializers(model.graph)
    for node in model.graph.node:
        if node.op_type == "RMSNormalization":
            scale = init[node.input[1]]
            scale.CopyFrom(numpy_helper.from_array(np.ones_like(numpy_helper.to_array(scale)), scale.name))


def _replace(graph, expand) -> None:
    nodes = []
    for node in graph.node:
        nodes += expand(node) or [node]
    del graph.node[:]
    graph.node.extend(nodes)


def norm_decomposed(model) -> None:
    """RMSNormalization written out: float32 mean of squares, root, divide, float16, scale."""
    graph = model.graph
    dtype = {t.name: t.data_type for t in graph.initializer}

    def expand(node):
        if node.op_type != "RMSNormalization":
            return None
        x, scale, p = node.input[0], node.input[1], node.name
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        graph.initializer.extend([numpy_helper.from_array(np.array(eps, np.float32), f"{p}/eps"),
                                  numpy_helper.from_array(np.array([-1], np.int64), f"{p}/axes")])
        return [helper.make_node("Cast", [x], [f"{p}/x32"], to=TensorProto.FLOAT),
                helper.make_node("Mul", [f"{p}/x32", f"{p}/x32"], [f"{p}/sq"]),
                helper.make_node("ReduceMean", [f"{p}/sq", f"{p}/axes"], [f"{p}/ms"], keepdims=1),
                helper.make_node("Add", [f"{p}/ms", f"{p}/eps"], [f"{p}/mse"]),
                helper.make_node("Sqrt", [f"{p}/mse"], [f"{p}/rms"]),
                helper.make_node("Div", [f"{p}/x32", f"{p}/rms"], [f"{p}/xn"]),
                helper.make_node("Cast", [f"{p}/xn"], [f"{p}/xn_t"], to=dtype[scale]),
                helper.make_node("Mul", [f"{p}/xn_t", scale], [node.output[0]])]
    _replace(graph, expand)


def add_fp32(model) -> None:
    """The residual adds in float32, their sums cast back to the graph's float type."""
    graph = model.graph
    adds = {n.output[0] for n in _residual_adds(graph)}
    # The graph's float type: its norms' scales are in it.
    init = _initializers(graph)
    to = next(init[n.input[1]].data_type for n in graph.node if n.op_type == "RMSNormalization")

    def expand(node):
        if node.op_type != "Add" or node.output[0] not in adds:
            return None
        (a, b), p = node.input, node.name
        return [helper.make_node("Cast", [a], [f"{p}/a32"], to=TensorProto.FLOAT),
                helper.make_node("Cast", [b], [f"{p}/b32"], to=TensorProto.FLOAT),
                helper.make_node("Add", [f"{p}/a32", f"{p}/b32"], [f"{p}/s32"]),
                helper.make_node("Cast", [f"{p}/s32"], [node.output[0]], to=to)]
    _replace(graph, expand)


def kv_len_mask(model) -> None:
    """Each Attention's K and V reshaped to [B, heads, S, head_dim] with S read from the attention
    mask's last dim: one shape symbol for every layer's key length instead of one per layer."""
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array(v, np.int64), f"kvlen/{k}")
                              for k, v in (("s0", [0]), ("s2", [2]), ("s3", [3]), ("s4", [4]))])
    head = [helper.make_node("Shape", ["attention_mask"], ["kvlen/mask_shape"]),
            helper.make_node("Slice", ["kvlen/mask_shape", "kvlen/s3", "kvlen/s4"], ["kvlen/S"])]

    def expand(node):
        if node.op_type != "Attention":
            return None
        nodes = []
        for k in (1, 2):
            src, p = node.input[k], f"{node.name}/kvlen{k}"
            nodes += [helper.make_node("Shape", [src], [f"{p}/shape"]),
                      helper.make_node("Slice", [f"{p}/shape", "kvlen/s0", "kvlen/s2"], [f"{p}/bh"]),
                      helper.make_node("Slice", [f"{p}/shape", "kvlen/s3", "kvlen/s4"], [f"{p}/d"]),
                      helper.make_node("Concat", [f"{p}/bh", "kvlen/S", f"{p}/d"], [f"{p}/to"], axis=0),
                      helper.make_node("Reshape", [src, f"{p}/to"], [f"{p}/out"])]
            node.input[k] = f"{p}/out"
        return nodes + [node]
    _replace(graph, expand)
    nodes = head + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


def attention_decomposed(model) -> None:
    """Each Attention written out as MatMul, scale, mask add, a softmax spelled as max, subtract, exp,
    sum and divide, and MatMul: a form the builder does not fuse into its attention kernel."""
    graph = model.graph
    graph.initializer.extend([numpy_helper.from_array(np.array([-1], np.int64), "attn/last_axis")])
    # The scale takes the graph's float type, read off its inputs (a fused decoder's are float16).
    floats = [i.type.tensor_type.elem_type for i in graph.input
              if i.type.tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16)]
    dtype = helper.tensor_dtype_to_np_dtype(floats[0] if floats else TensorProto.FLOAT16)

    def expand(node):
        if node.op_type != "Attention":
            return None
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if len(node.input) != 4 or len(node.output) != 1 or attrs.get("is_causal") or "scale" not in attrs:
            raise ValueError(f"{node.name}: written out only with Q, K, V, a mask, a scale and one output, "
                             "as the attention pass leaves it")
        q, k, v, mask = node.input
        scale = attrs["scale"]
        p = node.name
        graph.initializer.append(numpy_helper.from_array(np.array(scale, dtype), f"{p}/scale"))
        return [helper.make_node("Transpose", [k], [f"{p}/kt"], perm=[0, 1, 3, 2]),
                helper.make_node("MatMul", [q, f"{p}/kt"], [f"{p}/qk"]),
                helper.make_node("Mul", [f"{p}/qk", f"{p}/scale"], [f"{p}/scaled"]),
                helper.make_node("Add", [f"{p}/scaled", mask], [f"{p}/masked"]),
                helper.make_node("ReduceMax", [f"{p}/masked", "attn/last_axis"], [f"{p}/max"], keepdims=1),
                helper.make_node("Sub", [f"{p}/masked", f"{p}/max"], [f"{p}/shifted"]),
                helper.make_node("Exp", [f"{p}/shifted"], [f"{p}/exp"]),
                helper.make_node("ReduceSum", [f"{p}/exp", "attn/last_axis"], [f"{p}/sum"], keepdims=1),
                helper.make_node("Div", [f"{p}/exp", f"{p}/sum"], [f"{p}/probs"]),
                helper.make_node("MatMul", [f"{p}/probs", v], list(node.output))]
    _replace(graph, expand)


REWRITES = {"graph-fp16-o-down": fp16_o_down, "graph-swap-add": swap_add, "graph-norm-weight-1": norm_weight_1,
            "graph-norm-decomposed": norm_decomposed, "graph-add-fp32": add_fp32, "graph-kv-len-mask": kv_len_mask,
            "graph-attention-decomposed": attention_decomposed}


def rewritten(graph: Path, route: str, out: Path) -> Path:
    """``graph`` rewritten as ``route`` says, saved as ``out`` (weights beside it)."""
    model = onnx.load(graph)
    REWRITES[route](model)
    onnx.save(model, out, save_as_external_data=True, location=out.name + ".data")
    return out
