"""RMSNorm → one opset-23 ``RMSNormalization`` node.

Matched spelling (kvplan's exporter and transformers' LlamaRMSNorm, either exporter):

    x32 = [Cast(X → float32)]                        fp16/bf16 models only
    ms  = ReduceMean(Pow(x32, 2) | Mul(x32, x32), axes=[-1], keepdims=1)
    inv = Reciprocal(Sqrt(Add(ms, eps)))  |  Div(1, Sqrt(...))  |  Pow(Add(ms, eps), -0.5)
    n   = Mul(x32, inv)                   |  Div(x32, Sqrt(Add(ms, eps)))
    Y   = Mul(weight, [Cast(n → dtype(X))])

RMSNormalization with stash_type=1 is defined as exactly this: cast X to float32,
normalise, cast the normalised value back to X's type, then multiply by the scale
in that type. So the fp16/bf16 island only fuses when it casts to float32 and
back to X's own type, and a norm computed in fp16 without the island is refused
(stash_type=1 would silently change its numerics).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kvplan.lazy import lazy_import
from kvplan.surgery.framework import Pass
from kvplan.surgery.graphutil import (
    const_value,
    detach,
    dtype_name,
    ints,
    is_last_axis,
    last_dim,
    onnx_dtype,
    other_input,
    producer,
    producer_op,
    rank,
    scalar,
    unique_name,
)
from kvplan.surgery.pattern import Match

onnx = lazy_import("onnx")
gs = lazy_import("onnx_graphsurgeon")

F32 = 1                     # onnx.TensorProto.FLOAT (the ONNX standard's number)
ISLAND_TYPES = (10, 16)      # onnx.TensorProto.FLOAT16, BFLOAT16


PATTERN = "the norm, so the pattern cannot be replaced"


@dataclass
class Norm:
    """What the rewrite needs of one matched norm."""
    X: gs.Tensor            # the norm's input (before the fp32 island's Cast, where there is one)
    weight: gs.Tensor
    eps: float
    removed: list[gs.Node]  # the pattern's nodes; the island's input Cast is not among them
    anchor: gs.Node         # the ReduceMean, whose name the fused node takes
    scale: gs.Node          # Mul(weight): its output becomes the fused node's


class RMSNormPass(Pass):
    name = "rmsnorm"
    summary = "Pow/ReduceMean/Sqrt/Reciprocal/Mul RMSNorm → RMSNormalization (opset 23)"

    def candidates(self, graph):
        # Mean of a square: the one distinctive piece of every RMSNorm spelling.
        for n in graph.nodes:
            if n.op == "ReduceMean" and n.inputs and producer_op(n.inputs[0], "Pow", "Mul") is not None:
                yield n

    def match(self, graph, mean):
        sq = producer(mean.inputs[0])
        x = sq.inputs[0]
        if sq.op == "Pow" and scalar(sq.inputs[1]) != 2.0:
            return None  # some other power, not a mean square
        if sq.op == "Mul" and sq.inputs[0] is not sq.inputs[1]:
            return None  # a product of two tensors, not a square
        m = Match(graph, PATTERN, [sq, mean])
        self._reduction(m, sq, mean, x)
        add, eps = self._epsilon(m, mean)
        norm, inv = self._normalise(m, add, x)
        X, island = self._island(m, x)
        scale, cast_out = self._cast_back(m, norm, X, island)
        weight = self._weight(m, scale, (cast_out or norm).outputs[0], X)
        removed = [sq, mean, add, *inv, norm, scale] + ([cast_out] if cast_out is not None else [])
        found = Norm(X, weight, eps, removed, mean, scale)
        return lambda: _rewrite(graph, found)

    # --- checks, in the order the pattern is walked ---

    @staticmethod
    def _reduction(m: Match, sq, mean, x) -> None:
        """The mean is over the last axis only, keeping it, and reads a square nothing else reads."""
        axes = ints(mean.inputs[1]) if len(mean.inputs) > 1 else mean.attrs.get("axes")
        if axes is None:
            m.reject("ReduceMean axes are not a constant")
        if len(axes) != 1 or not is_last_axis(int(axes[0]), x):
            m.reject(f"ReduceMean over axes {list(axes)}, not the last axis only")
        if mean.attrs.get("keepdims", 1) != 1:
            m.reject("ReduceMean has keepdims=0")
        m.sole(sq.outputs[0], "the squared input")

    @staticmethod
    def _epsilon(m: Match, mean) -> tuple[gs.Node, float]:
        add = m.after(m.sole(mean.outputs[0], "the mean square"))
        if add.op != "Add":
            m.reject(f"the mean square feeds {add.op}, not Add(epsilon)")
        eps_t = other_input(add, mean.outputs[0])
        eps_v = const_value(eps_t)
        if eps_v is None:
            m.reject(f"epsilon ({eps_t.name}) is not a constant")
        if eps_v.size != 1:
            m.reject(f"epsilon has {eps_v.size} elements, not one")
        eps = float(eps_v.reshape(-1)[0])
        if not math.isfinite(eps) or eps < 0:
            m.reject(f"epsilon {eps} is not a finite non-negative number")
        return add, eps

    @staticmethod
    def _normalise(m: Match, add, x) -> tuple[gs.Node, list[gs.Node]]:
        """Follow Add(eps) to the product/quotient that normalises x; returns (that node, the nodes between)."""
        first = m.after(m.sole(add.outputs[0], "the mean square plus epsilon"))
        if first.op == "Pow":
            if scalar(first.inputs[1]) != -0.5:
                m.reject("Pow after Add(epsilon) is not x ** -0.5")
            chain = [first]
        elif first.op == "Sqrt":
            root = first.outputs[0]
            nxt = m.after(m.sole(root, "the root mean square"))
            if nxt.op == "Div" and nxt.inputs[1] is root and nxt.inputs[0] is x:
                return nxt, [first]  # x / sqrt(ms + eps)
            if nxt.op == "Reciprocal" or (nxt.op == "Div" and nxt.inputs[1] is root and scalar(nxt.inputs[0]) == 1.0):
                chain = [first, nxt]
            else:
                m.reject(f"sqrt(mean square + eps) feeds {nxt.op}, not a reciprocal")
        else:
            m.reject(f"Add(epsilon) feeds {first.op}, not Sqrt or Pow(-0.5)")
        inv = chain[-1].outputs[0]
        norm = m.after(m.sole(inv, "the reciprocal root mean square"))
        if norm.op != "Mul" or other_input(norm, inv) is not x:
            m.reject("the reciprocal root mean square does not multiply the norm's own input")
        return norm, chain

    @staticmethod
    def _island(m: Match, x) -> tuple[gs.Tensor, bool]:
        """The norm runs in float32, on X itself or on X cast from fp16/bf16 (the island)."""
        x_type = onnx_dtype(x)
        if x_type != F32:
            m.reject(f"the norm is computed in {dtype_name(x_type)}, not float32; "
                     "RMSNormalization(stash_type=1) would change its numerics")
        cast_in = producer_op(x, "Cast")
        island = cast_in is not None and onnx_dtype(cast_in.inputs[0]) in ISLAND_TYPES
        if island:
            m.before(cast_in)
        return (cast_in.inputs[0] if island else x), island

    @staticmethod
    def _cast_back(m: Match, norm, X, island: bool) -> tuple[gs.Node, gs.Node | None]:
        """An island casts the normalised value back to X's own type; returns (Mul(weight), that Cast)."""
        nxt = m.sole(norm.outputs[0], "the normalised value")
        cast_out = None
        if nxt.op == "Cast":
            cast_out = m.after(nxt)
            to, want = cast_out.attrs.get("to"), onnx_dtype(X)
            if to != want:
                m.reject(f"the normalised value is cast to {dtype_name(to)}, but the norm's input is "
                         f"{dtype_name(want)}")
            nxt = m.sole(cast_out.outputs[0], "the cast-back value")
        elif island:
            m.reject(f"the input is cast from {dtype_name(onnx_dtype(X))} to float32 but the result is "
                     f"not cast back (next op: {nxt.op})")
        m.after(nxt)
        if nxt.op != "Mul":
            m.reject(f"the normalised value feeds {nxt.op}, not Mul(weight)")
        return nxt, cast_out

    @staticmethod
    def _weight(m: Match, scale, normalised, X) -> gs.Tensor:
        """The scale is a constant [D] in X's dtype."""
        w = other_input(scale, normalised)
        wv = const_value(w)
        if wv is None:
            m.reject(f"the scale ({w.name}) is not a constant weight")
        d = last_dim(X)
        if d is None:
            m.reject("the size of the normalised axis is not static")
        r = rank(X)
        if wv.ndim < 1 or wv.shape[-1] != d or int(np.prod(wv.shape[:-1])) != 1 or (r is not None and wv.ndim > r):
            m.reject(f"weight shape {list(wv.shape)} is not [{d}]")
        if onnx_dtype(w) != onnx_dtype(X):
            m.reject(f"weight dtype {dtype_name(onnx_dtype(w))} differs from the input's "
                     f"{dtype_name(onnx_dtype(X))}")
        return w


def _rewrite(graph: gs.Graph, n: Norm) -> None:
    y = n.scale.outputs[0]
    name = n.anchor.name
    base = name.rsplit("/", 1)[0] if "/" in name else name
    detach(n.removed)
    # The island's Cast stays when something else (a residual) reads its output; cleanup drops it otherwise.
    graph.nodes.append(gs.Node(
        "RMSNormalization", name=unique_name(graph, f"{base}/RMSNormalization"),
        attrs={"axis": -1, "epsilon": n.eps, "stash_type": 1}, inputs=[n.X, n.weight], outputs=[y]))


PASS = RMSNormPass()
