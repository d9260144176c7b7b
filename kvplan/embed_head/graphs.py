"""ONNX graphs of a model's embedding and LM head, in the forms TensorRT and ONNX Runtime share.

    embed.onnx   input_ids [B, N] int64 -> Gather(E) (x the family's scale) -> hidden_in [B, N, hidden]
    head.onnx    hidden_out [B, N, hidden] -> (last row) -> MatMul(W^T) -> (softcap) -> logits [B, N|1, vocab]
                 or, with top_k, -> TopK -> top_values [B, N|1, k], top_ids [B, N|1, k] int64

The output of one is the decoder's input by name and the decoder's output the other's input, so a
runtime chains the three by name. Both compute in the profile's dtype, as transformers' model in
that dtype does (Gemma 2's √hidden scale is rounded to it first, and its soft-cap runs in it).
An int4 head is the decoder's int4 form: DequantizeLinear(q INT4 [hidden, vocab], scale, axis 0,
block_size G) -> MatMul, rounded to nearest per group (kvplan.quantize.rtn).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvplan.lazy import lazy_import
from kvplan.quantize.graph import NP_DTYPES, _const, _int4_const, _to_np
from kvplan.quantize.rtn import quantize_linear

ir = lazy_import("onnx_ir")
torch = lazy_import("torch")

ONNX_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16, "bfloat16": ir.DataType.BFLOAT16}
OPSET = 21          # DequantizeLinear's block_size and INT4 (what the decoder's int4 graphs use)
INT64_MAX = np.iinfo(np.int64).max


@dataclass
class Graph:
    """One graph of the model's ends: ``name`` is its file's stem (``embed`` -> embed.onnx),
    ``contract`` its inputs and outputs as the decoder's io contract spells them (symbolic axes
    as strings), ``weight_bytes`` what its initializers hold."""
    name: str
    model: ir.Model
    contract: dict
    weight_bytes: int


def _value(name: str, dtype: ir.DataType, shape: list) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(shape))


def _model(name: str, inputs: list[ir.Value], outputs: list[ir.Value], nodes: list[ir.Node],
           initializers: list[ir.Value]) -> ir.Model:
    graph = ir.Graph(inputs, outputs, nodes=nodes, initializers=initializers, opset_imports={"": OPSET},
                     name=name)
    return ir.Model(graph, ir_version=10, producer_name="kvplan")


def _np(t: torch.Tensor, dtype: str) -> np.ndarray:
    return _to_np(t, NP_DTYPES[ONNX_DTYPES[dtype]])


def _scalar(name: str, value: float, dtype: str) -> ir.Value:
    # Rounded to the dtype as transformers rounds it (a tensor of the model's dtype).
    return _const(name, _np(torch.tensor(value, dtype=torch.float32), dtype).reshape(()))


def _contract(inputs: dict, outputs: dict) -> dict:
    return {"inputs": inputs, "outputs": outputs}


def embed_graph(matrix: torch.Tensor, scale: float, dtype: str, batch: int | str) -> Graph:
    """``input_ids`` -> ``hidden_in``: rows of ``matrix`` [vocab, hidden] (times ``scale`` unless 1)."""
    vocab, hidden = matrix.shape
    ids = _value("input_ids", ir.DataType.INT64, [batch, "N"])
    table = _const("embed_tokens.weight", _np(matrix, dtype))
    gather = ir.node("Gather", [table, ids], attributes={"axis": 0}, name="embed/gather")
    nodes, inits, out = [gather], [table], gather.outputs[0]
    if scale != 1.0:
        factor = _scalar("embed_scale", scale, dtype)
        mul = ir.node("Mul", [out, factor], name="embed/scale")
        nodes.append(mul)
        inits.append(factor)
        out = mul.outputs[0]
    out.name, out.dtype, out.shape = "hidden_in", ONNX_DTYPES[dtype], ir.Shape([batch, "N", hidden])
    contract = _contract({"input_ids": {"shape": [batch, "N"], "dtype": "int64"}},
                         {"hidden_in": {"shape": [batch, "N", hidden], "dtype": dtype}})
    return Graph("embed", _model("embed", [ids], [out], nodes, inits), contract, table.const_value.nbytes)


def _last_row(x: ir.Value, nodes: list, inits: list) -> ir.Value:
    """x[:, -1:, :] (decode needs only the last position's logits)."""
    starts, ends, axes = (_const(f"head/last_{n}", np.array([v], dtype=np.int64))
                          for n, v in (("starts", -1), ("ends", INT64_MAX), ("axes", 1)))
    node = ir.node("Slice", [x, starts, ends, axes], name="head/last")
    nodes.append(node)
    inits += [starts, ends, axes]
    return node.outputs[0]


def _weight(weight: torch.Tensor, dtype: str, int4_group: int, nodes: list, inits: list) -> tuple[ir.Value, int]:
    """W^T [hidden, vocab], as the graph dtype's initializer or as DequantizeLinear of int4."""
    if not int4_group:
        # Rounded first, then transposed: the same values, and the copy is of the graph's dtype.
        w_t = _const("lm_head.weight_t", np.ascontiguousarray(_np(weight, dtype).T))
        inits.append(w_t)
        return w_t, w_t.const_value.nbytes
    ql = quantize_linear("lm_head.weight", weight, int4_group)
    q = _int4_const("lm_head.qweight", ql.q)
    scale = _const("lm_head.scales", _np(ql.scale, dtype))
    dq = ir.node("DequantizeLinear", [q, scale], attributes={"axis": 0, "block_size": int4_group},
                 name="head/dequantize")
    dq.outputs[0].name = "lm_head.dequantized"
    nodes.append(dq)
    inits += [q, scale]
    return dq.outputs[0], ql.q.numel() // 2 + scale.const_value.nbytes


def head_graph(weight: torch.Tensor, dtype: str, batch: int | str, softcap: float = 0.0, last_only: bool = False,
               top_k: int = 0, int4_group: int = 0) -> Graph:
    """``hidden_out`` -> ``logits`` (or the ``top_k`` largest as ``top_values``/``top_ids``) for the LM
    head ``weight`` [vocab, hidden]; ``last_only``: only the last position's; ``int4_group``: the
    weight in int4 with groups of that many hidden channels (0: the profile dtype)."""
    vocab, hidden = weight.shape
    x = _value("hidden_out", ONNX_DTYPES[dtype], [batch, "N", hidden])
    nodes: list = []
    inits: list = []
    h = _last_row(x, nodes, inits) if last_only else x
    w_t, weight_bytes = _weight(weight, dtype, int4_group, nodes, inits)
    mm = ir.node("MatMul", [h, w_t], name="head/matmul")
    nodes.append(mm)
    out = mm.outputs[0]
    if softcap:
        cap = _scalar("head/softcap", softcap, dtype)
        div = ir.node("Div", [out, cap], name="head/softcap_div")
        tanh = ir.node("Tanh", [div.outputs[0]], name="head/softcap_tanh")
        mul = ir.node("Mul", [tanh.outputs[0], cap], name="head/softcap_mul")
        nodes += [div, tanh, mul]
        inits.append(cap)
        out = mul.outputs[0]
    rows = 1 if last_only else "N"
    float_type = ONNX_DTYPES[dtype]
    if top_k:
        k = _const("head/k", np.array([top_k], dtype=np.int64))
        topk = ir.node("TopK", [out, k], attributes={"axis": -1, "largest": 1, "sorted": 1}, num_outputs=2,
                       name="head/topk")
        nodes.append(topk)
        inits.append(k)
        values, ids = topk.outputs
        values.name, values.dtype, values.shape = "top_values", float_type, ir.Shape([batch, rows, top_k])
        ids.name, ids.dtype, ids.shape = "top_ids", ir.DataType.INT64, ir.Shape([batch, rows, top_k])
        outputs = [values, ids]
        contract_out = {"top_values": {"shape": [batch, rows, top_k], "dtype": dtype},
                        "top_ids": {"shape": [batch, rows, top_k], "dtype": "int64"}}
    else:
        out.name, out.dtype, out.shape = "logits", float_type, ir.Shape([batch, rows, vocab])
        outputs = [out]
        contract_out = {"logits": {"shape": [batch, rows, vocab], "dtype": dtype}}
    contract = _contract({"hidden_out": {"shape": [batch, "N", hidden], "dtype": dtype}}, contract_out)
    return Graph("head", _model("head", [x], outputs, nodes, inits), contract, weight_bytes)


def int4_bytes(vocab: int, hidden: int, group: int, dtype_bytes: int = 2) -> int:
    """An int4 head's weight bytes: half a byte a value plus one scale per group."""
    return vocab * hidden // 2 + vocab * (hidden // group) * dtype_bytes


__all__ = ["Graph", "embed_graph", "head_graph", "int4_bytes"]
