"""A residual add of a dequantized linear → the linear and the add on [tokens, features] views.

Matched (an int4 graph's o_proj and down_proj, added to the residual stream):

    W = DequantizeLinear(q, scale[, zero_point])       the weight, [K, H]
    Y = Add(MatMul(X, W), R)  |  Add(R, MatMul(X, W))  X [..., K], R the shape of MatMul(X, W)

Rewritten:

    Y = Reshape(Add(MatMul(Reshape(X, [-1, K]), W), Reshape(R, [-1, H])), Shape(R))

The same numbers (reshapes are exact, and every token's row is multiplied alone either way); the
graph's own tensors keep their names and shapes. Why: TensorRT-RTX fuses such an add into the
RMSNorm kernel after it (an int4 linear takes no epilogue), and with the linear on rank-3
tensors it stores that kernel's CUDA source in the plan once per call, 80 copies of about
150 KiB on the default model, where on [tokens, features] views it stores a handful
(bench/weight_copies.py). With float weights the builder fuses the add into the GEMM instead, so
a float linear is not a candidate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvplan.lazy import lazy_import
from kvplan.surgery.framework import Pass
from kvplan.surgery.graphutil import (
    detach,
    int_constant,
    last_dim,
    onnx_dtype,
    other_input,
    producer_op,
    rank,
    same_dim,
    unique_name,
)
from kvplan.surgery.pattern import Match

gs = lazy_import("onnx_graphsurgeon")

PATTERN = "the residual add, so the linear cannot be reshaped"


@dataclass
class Residual:
    """What the rewrite needs of one matched residual add."""
    add: gs.Node
    matmul: gs.Node
    x: gs.Tensor            # the linear's input [..., K]
    weight: gs.Tensor       # DequantizeLinear's output [K, H]
    residual: gs.Tensor     # the other operand, [..., H]
    k: int
    h: int
    linear_first: bool      # the add's operand order, kept


class Residual2DPass(Pass):
    name = "residual2d"
    summary = "Add(MatMul(X, DequantizeLinear W), R) → the MatMul and the Add on 2-D views"

    def candidates(self, graph):
        for n in graph.nodes:
            if n.op != "Add" or len(n.inputs) != 2 or not any(self._linear(t) is not None for t in n.inputs):
                continue
            # Two products summed (an int4 linear with a zero point, x @ (s * q) + x_groups @ m) are one
            # linear, not a linear and a residual; TensorRT-RTX fuses that add elsewhere, and on
            # 2-D views it stored more kernel source there, not less.
            if all(producer_op(t, "MatMul") is not None for t in n.inputs):
                continue
            yield n

    @staticmethod
    def _linear(t: gs.Tensor) -> gs.Node | None:
        """The MatMul producing ``t`` if its weight is dequantized (int4) and ``t`` is not already 2-D."""
        mm = producer_op(t, "MatMul")
        if mm is None or producer_op(mm.inputs[1], "DequantizeLinear") is None:
            return None
        return mm if rank(mm.inputs[0]) != 2 else None

    def match(self, graph, add):
        first = self._linear(add.inputs[0])
        mm = first if first is not None else self._linear(add.inputs[1])
        y = mm.outputs[0]
        m = Match(graph, PATTERN, [mm, add])
        m.sole(y, "the linear's output")
        x, w = mm.inputs
        residual = other_input(add, y)
        if rank(w) != 2:
            m.reject(f"the dequantized weight ({w.name}) has rank {rank(w)}, not 2")
        k, h = last_dim(x), last_dim(w)
        if k is None or h is None:
            m.reject(f"the linear's sizes are not static ({x.name} {x.shape}, {w.name} {w.shape})")
        if w.shape[0] != k:
            m.reject(f"the weight {w.name} {list(w.shape)} does not take the input's last axis ({k})")
        if not _same_shape(residual, y):
            m.reject(f"the residual {residual.name} {residual.shape} is not known to have the linear's shape "
                     f"{y.shape} (the add would broadcast)")
        if onnx_dtype(residual) != onnx_dtype(y):
            m.reject(f"the residual {residual.name} and the linear's output differ in type")
        found = Residual(add, mm, x, w, residual, k, h, linear_first=first is not None)
        return lambda: _rewrite(graph, found)


def _same_shape(a: gs.Tensor, b: gs.Tensor) -> bool:
    """Equal ranks and every dim known equal."""
    if a.shape is None or b.shape is None or len(a.shape) != len(b.shape):
        return False
    return all(same_dim(da, db) for da, db in zip(a.shape, b.shape))


def _view(graph: gs.Graph, t: gs.Tensor, width: int, base: str, name: str) -> gs.Tensor:
    """``t`` reshaped to [tokens, width]."""
    shape = int_constant(graph, f"{base}/{name}_shape", [-1, width])
    out = gs.Variable(unique_name(graph, f"{base}/{name}_2d"), dtype=t.dtype, shape=None)
    graph.nodes.append(gs.Node("Reshape", name=unique_name(graph, f"{base}/{name}_2d"),
                               inputs=[t, shape], outputs=[out]))
    return out


def _rewrite(graph: gs.Graph, r: Residual) -> None:
    y = r.add.outputs[0]
    base = r.add.name
    mm_name, add_name = r.matmul.name, r.add.name
    detach([r.matmul, r.add])
    x2 = _view(graph, r.x, r.k, base, "input")
    res2 = _view(graph, r.residual, r.h, base, "residual")
    lin2 = gs.Variable(unique_name(graph, f"{mm_name}_2d"), dtype=y.dtype, shape=None)
    sum2 = gs.Variable(unique_name(graph, f"{add_name}_2d"), dtype=y.dtype, shape=None)
    shape = gs.Variable(unique_name(graph, f"{base}/residual_shape"), dtype=np.int64, shape=None)
    graph.nodes += [
        gs.Node("MatMul", name=mm_name, inputs=[x2, r.weight], outputs=[lin2]),
        gs.Node("Add", name=add_name, inputs=[lin2, res2] if r.linear_first else [res2, lin2], outputs=[sum2]),
        gs.Node("Shape", name=unique_name(graph, f"{base}/residual_shape"), inputs=[r.residual], outputs=[shape]),
        gs.Node("Reshape", name=unique_name(graph, f"{base}/restore"), inputs=[sum2, shape], outputs=[y]),
    ]


PASS = Residual2DPass()
