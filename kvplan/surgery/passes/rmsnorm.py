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

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from kvplan.surgery.framework import Pass
from kvplan.surgery.graphutil import (Rejected, const_value, detach, dtype_name, ints, is_last_axis, last_dim,
                                     onnx_dtype, other_input, producer, producer_op, rank, scalar, unique_name)
from kvplan.surgery.pattern import Match

F32 = onnx.TensorProto.FLOAT
ISLAND_TYPES = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)


PATTERN = "the norm, so the pattern cannot be replaced"


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
        seen = [sq, mean]
        m = Match(graph, PATTERN, seen)
        x = sq.inputs[0]
        if sq.op == "Pow":
            if scalar(sq.inputs[1]) != 2.0:
                return None  # some other power, not a mean square
        elif sq.inputs[0] is not sq.inputs[1]:
            return None  # a product of two tensors, not a square

        # --- the reduction: over the last axis only, keeping it ---
        axes = ints(mean.inputs[1]) if len(mean.inputs) > 1 else mean.attrs.get("axes")
        if axes is None:
            raise Rejected("ReduceMean axes are not a constant", seen)
        if len(axes) != 1 or not is_last_axis(int(axes[0]), x):
            raise Rejected(f"ReduceMean over axes {list(axes)}, not the last axis only", seen)
        if mean.attrs.get("keepdims", 1) != 1:
            raise Rejected("ReduceMean has keepdims=0", seen)
        m.sole(sq.outputs[0], "the squared input")

        # --- epsilon ---
        add = m.sole(mean.outputs[0], "the mean square")
        seen.append(add)
        if add.op != "Add":
            raise Rejected(f"the mean square feeds {add.op}, not Add(epsilon)", seen)
        eps_t = other_input(add, mean.outputs[0])
        eps_v = const_value(eps_t)
        if eps_v is None:
            raise Rejected(f"epsilon ({eps_t.name}) is not a constant", seen)
        if eps_v.size != 1:
            raise Rejected(f"epsilon has {eps_v.size} elements, not one", seen)
        eps = float(eps_v.reshape(-1)[0])
        if not math.isfinite(eps) or eps < 0:
            raise Rejected(f"epsilon {eps} is not a finite non-negative number", seen)

        # --- 1/sqrt and the normalising product ---
        norm, inv = self._normalise(m, add, x)

        # --- input dtype and the optional fp32 island ---
        x_type = onnx_dtype(x)
        if x_type != F32:
            raise Rejected(f"the norm is computed in {dtype_name(x_type)}, not float32; "
                           "RMSNormalization(stash_type=1) would change its numerics", seen)
        cast_in = producer_op(x, "Cast")
        src = cast_in.inputs[0] if cast_in is not None else None
        island = src is not None and onnx_dtype(src) in ISLAND_TYPES
        X = src if island else x
        if island:
            seen.insert(0, cast_in)
        out = norm.outputs[0]
        nxt = m.sole(out, "the normalised value")
        cast_out = None
        if nxt.op == "Cast":
            cast_out = nxt
            seen.append(cast_out)
            to = cast_out.attrs.get("to")
            want = onnx_dtype(X)
            if to != want:
                raise Rejected(f"the normalised value is cast to {dtype_name(to)}, but the norm's input is "
                               f"{dtype_name(want)}", seen)
            out = cast_out.outputs[0]
            nxt = m.sole(out, "the cast-back value")
        elif island:
            raise Rejected(f"the input is cast from {dtype_name(onnx_dtype(X))} to float32 but the result is "
                           f"not cast back (next op: {nxt.op})", seen)

        # --- the scale ---
        seen.append(nxt)
        if nxt.op != "Mul":
            raise Rejected(f"the normalised value feeds {nxt.op}, not Mul(weight)", seen)
        w = other_input(nxt, out)
        wv = const_value(w)
        if wv is None:
            raise Rejected(f"the scale ({w.name}) is not a constant weight", seen)
        d = last_dim(X)
        if d is None:
            raise Rejected("the size of the normalised axis is not static", seen)
        r = rank(X)
        if wv.ndim < 1 or wv.shape[-1] != d or int(np.prod(wv.shape[:-1])) != 1 or (r is not None and wv.ndim > r):
            raise Rejected(f"weight shape {list(wv.shape)} is not [{d}]", seen)
        if onnx_dtype(w) != onnx_dtype(X):
            raise Rejected(f"weight dtype {dtype_name(onnx_dtype(w))} differs from the input's "
                           f"{dtype_name(onnx_dtype(X))}", seen)

        def rewrite():
            y = nxt.outputs[0]
            base = mean.name.rsplit("/", 1)[0] if "/" in mean.name else mean.name
            removed = [sq, mean, add, *inv, norm, nxt] + ([cast_out] if cast_out is not None else [])
            detach(removed)
            # The island's Cast stays when something else (a residual) reads its output;
            # cleanup drops it otherwise.
            graph.nodes.append(gs.Node(
                "RMSNormalization", name=unique_name(graph, f"{base}/RMSNormalization"),
                attrs={"axis": -1, "epsilon": eps, "stash_type": 1}, inputs=[X, w], outputs=[y]))
        return rewrite

    def _normalise(self, m: Match, add, x):
        """Follow Add(eps) to the product/quotient that normalises x; returns (that node, the nodes between)."""
        seen = m.nodes
        s = add.outputs[0]
        first = m.sole(s, "the mean square plus epsilon")
        seen.append(first)
        if first.op == "Pow":
            if scalar(first.inputs[1]) != -0.5:
                raise Rejected("Pow after Add(epsilon) is not x ** -0.5", seen)
            chain = [first]
        elif first.op == "Sqrt":
            root = first.outputs[0]
            nxt = m.sole(root, "the root mean square")
            seen.append(nxt)
            if nxt.op == "Div" and nxt.inputs[1] is root and nxt.inputs[0] is x:
                return nxt, [first]  # x / sqrt(ms + eps)
            if nxt.op == "Reciprocal":
                chain = [first, nxt]
            elif nxt.op == "Div" and nxt.inputs[1] is root and scalar(nxt.inputs[0]) == 1.0:
                chain = [first, nxt]
            else:
                raise Rejected(f"sqrt(mean square + eps) feeds {nxt.op}, not a reciprocal", seen)
        else:
            raise Rejected(f"Add(epsilon) feeds {first.op}, not Sqrt or Pow(-0.5)", seen)
        inv = chain[-1].outputs[0]
        norm = m.sole(inv, "the reciprocal root mean square")
        seen.append(norm)
        if norm.op != "Mul" or other_input(norm, inv) is not x:
            raise Rejected("the reciprocal root mean square does not multiply the norm's own input", seen)
        return norm, chain


PASS = RMSNormPass()
