"""Scaled dot-product attention core → one opset-23 ``Attention`` node (single output ``Y``).

Matched spelling (kvplan's exporter and transformers' eager attention), 4D tensors:

    k4     = K | Reshape(Expand(Unsqueeze(K, axis=2), [B, KV, rep, S, D]), [B, KV*rep, S, D])   (GQA)
    v4     = likewise from V
    scores = Mul(MatMul(Q, Transpose(k4, perm=[0, 1, 3, 2])), scale)  |  Div(..., 1/scale)
    biased = Add(scores, mask)                                         (optional)
    probs  = Softmax(biased, axis=-1)                                  computed in the graph's dtype, or
           = Cast(Softmax(Cast(biased → float32), axis=-1) → dtype)    the fp32 island of fp16/bf16 models
    Y      = MatMul(probs, v4)                                         [B, H, N, Dv]

becomes ``Y = Attention(Q, K, V, mask; scale, is_causal=0)``: Q [B, H, N, D],
K/V [B, KV, S, D] (the cache already concatenated: no past/present inputs or outputs, the form
TensorRT's parser accepts), mask the graph's own additive mask. The checks, against the opset-23
definition (the text of the spec and onnx's reference implementation):

- scale: Attention computes (Q*sqrt(scale)) (K*sqrt(scale))^T and adds attn_mask *after* that,
  so the scale must be applied to QK^T before the mask is added (a mask added before scaling
  would be scaled too: refused). It must be a constant scalar; it is written as the ``scale``
  attribute explicitly (never the 1/sqrt(head_size) default).
- mask: a float mask of Q's dtype whose shape broadcasts to the scores [B, H, N, S] without
  enlarging them (what the Add did).
- softmax: over the last axis (the only one Attention normalises). An fp32 softmax island
  (Cast to float32 → Softmax → Cast back) is accepted and written *without* the
  ``softmax_precision`` attribute: TensorRT's ONNX parser (TensorRT-RTX 1.7) refuses the
  attribute whatever its value ("Setting softmax precision is not supported in TensorRT
  Attention."), while both consumers keep the softmax in fp32 anyway: TensorRT's fused attention
  kernels accumulate the softmax in fp32, and ONNX Runtime's CPU kernel gives identical fp16
  outputs with the attribute absent, FLOAT or FLOAT16. The numeric tests hold the fused graph to
  the unfused one.
- GQA: Attention repeats each KV head contiguously (np.repeat on the head axis: kv head j serves
  q heads j*rep .. j*rep+rep-1), which is what Unsqueeze(axis 2) → Expand along that axis →
  Reshape merging (KV, rep) produces. A Tile on the head axis, or an Unsqueeze on axis 1 (head
  order h0, h1, h0, h1, ...), repeats them the other way round and is refused.
- the intermediate tensors (scores, probabilities) are used by nothing else.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from kvplan.surgery.framework import Pass
from kvplan.surgery.graphutil import (Rejected, sole_consumer, const_value, detach, dtype_name, ints, is_last_axis, onnx_dtype,
                         other_input, producer, producer_op, rank, unique_name)

F32 = onnx.TensorProto.FLOAT


def _same_dim(a, b) -> bool:
    """Two dims known to be equal: equal ints, or the same symbol."""
    if isinstance(a, int) and isinstance(b, int):
        return a >= 0 and a == b
    return isinstance(a, str) and isinstance(b, str) and a != "" and a == b


def _shape(t: gs.Tensor) -> list | None:
    return list(t.shape) if t.shape is not None else None


def _sole(graph, t: gs.Tensor, seen, what) -> gs.Node:
    return sole_consumer(t, graph, seen, what, "the attention pattern")


class AttentionPass(Pass):
    name = "attention"
    summary = "MatMul/scale/mask/Softmax/MatMul attention (MHA, GQA) → Attention (opset 23)"

    def candidates(self, graph):
        for n in graph.nodes:
            if n.op == "Softmax":
                yield n

    def match(self, graph, softmax):
        seen = [softmax]
        # --- the softmax and its optional fp32 island ---
        x = softmax.inputs[0]
        cast_in = producer_op(x, "Cast")
        biased = cast_in.inputs[0] if cast_in is not None else x
        probs = softmax.outputs[0]
        cast_out = None
        if len(probs.outputs) == 1 and probs.outputs[0].op == "Cast" and probs not in graph.outputs:
            cast_out = probs.outputs[0]
            probs = cast_out.outputs[0]
        pv = probs.outputs[0] if len(probs.outputs) == 1 else None
        qk_side = self._score_chain(biased)
        if qk_side is None and (pv is None or pv.op != "MatMul"):
            return None  # a softmax that neither reads QK^T nor feeds ·V: not attention
        if cast_in is not None:
            seen.insert(0, cast_in)
        if cast_out is not None:
            seen.append(cast_out)
        if pv is not None:
            seen.append(pv)
        axis = softmax.attrs.get("axis", -1)
        if not is_last_axis(axis, softmax.inputs[0]):
            raise Rejected(f"Softmax over axis {axis}, not the last axis (the only one Attention normalises)", seen)
        if pv is None or pv.op != "MatMul" or pv.inputs[0] is not probs:
            what = "nothing else" if pv is None else f"{pv.op} ({pv.name})"
            raise Rejected(f"the probabilities feed {what}, not MatMul(probs, V) alone", seen)

        # --- scores: [Add(mask)] after [Mul|Div(scale)] after MatMul(Q, Transpose(K)) ---
        add = producer_op(biased, "Add")
        mask = None
        scores = biased
        if add is not None and (self._is_qk_scaled(add.inputs[0]) or self._is_qk_scaled(add.inputs[1])):
            seen.insert(0, add)
            scores = add.inputs[0] if self._is_qk_scaled(add.inputs[0]) else add.inputs[1]
            mask = other_input(add, scores)
        elif add is not None and any(producer_op(i, "Mul", "Div") is not None for i in add.inputs):
            seen.insert(0, add)
            raise Rejected(f"{add.name} adds the mask to something that is not scale * MatMul(Q, K^T)", seen)
        scale_node = producer_op(scores, "Mul", "Div")
        if scale_node is None:
            qk_mm = producer_op(scores, "MatMul")
            if qk_mm is None:
                raise Rejected(f"the softmax input is {self._describe(scores)}, not (Q K^T) * scale [+ mask]", seen)
            scale = 1.0  # no scaling in the graph: Attention must not apply its default 1/sqrt(D)
            seen.insert(0, qk_mm)
        else:
            seen.insert(0, scale_node)
            data = [i for i in scale_node.inputs if producer_op(i, "MatMul") is not None]
            if scale_node.op == "Div":
                data = data[:1] if data and scale_node.inputs[0] is data[0] else []
            if not data:
                inner = producer_op(scale_node.inputs[0], "Add") or producer_op(scale_node.inputs[1], "Add")
                if inner is not None and any(producer_op(i, "MatMul") is not None for i in inner.inputs):
                    seen.insert(0, inner)
                    raise Rejected(f"the mask is added before scaling ({inner.name} then {scale_node.name}); "
                                   "Attention adds attn_mask after scaling QK^T", seen)
                raise Rejected(f"{scale_node.name} does not scale a MatMul(Q, K^T)", seen)
            qk_mm = producer(data[0])
            seen.insert(0, qk_mm)
            s_t = other_input(scale_node, data[0])
            sv = const_value(s_t)
            if sv is None:
                raise Rejected(f"the scale ({s_t.name}) is not a constant", seen)
            if sv.size != 1:
                raise Rejected(f"the scale ({s_t.name}) has shape {list(sv.shape)}, not one value: "
                               "Attention applies one scale to every head and position", seen)
            c = float(sv.reshape(-1)[0])
            scale = 1.0 / c if scale_node.op == "Div" and c != 0 else c
            if not math.isfinite(scale) or scale <= 0:
                raise Rejected(f"the scale {c} ({scale_node.op}) is not a finite positive number", seen)
            _sole(graph, qk_mm.outputs[0], seen, "Q K^T")
        if mask is not None or scale_node is not None:
            _sole(graph, scores, seen, "the scaled scores")
        if mask is not None:
            _sole(graph, biased, seen, "the masked scores")

        # --- Q, K ---
        q, kt = qk_mm.inputs
        tr = producer_op(kt, "Transpose")
        if tr is None or tr.attrs.get("perm") not in ([0, 1, 3, 2],):
            perm = tr.attrs.get("perm") if tr is not None else None
            raise Rejected(f"the second operand of {qk_mm.name} is {self._describe(kt)}"
                           f"{f' with perm {list(perm)}' if perm is not None else ''}, not Transpose(K, [0, 1, 3, 2])",
                           seen)
        seen.insert(0, tr)
        _sole(graph, kt, seen, "K^T")
        k4 = tr.inputs[0]
        v4 = pv.inputs[1]
        for t, what in ((q, "Q"), (k4, "K"), (v4, "V")):
            if rank(t) != 4:
                raise Rejected(f"{what} ({t.name}) has rank {rank(t)}, not 4 ([batch, heads, seq, head_dim])", seen)
        qt = onnx_dtype(q)
        for t, what in ((k4, "K"), (v4, "V")):
            if onnx_dtype(t) != qt:
                raise Rejected(f"{what} is {dtype_name(onnx_dtype(t))}, Q is {dtype_name(qt)}", seen)
        # Sequence lengths and head sizes need no check: the graph's own MatMuls only run when
        # they agree, and Attention requires the same. Head counts decide the GQA grouping.
        qs = _shape(q)
        heads = qs[1]
        if not isinstance(heads, int) or heads <= 0:
            raise Rejected(f"the number of query heads of {q.name} ({heads}) is not static", seen)
        k, k_rep = self._unrepeat(graph, k4, heads, "K", seen)
        v, v_rep = self._unrepeat(graph, v4, heads, "V", seen)
        if k_rep != v_rep:
            raise Rejected(f"K is repeated {k_rep}x, V {v_rep}x", seen)

        # --- the softmax precision ---
        if cast_in is not None:
            to = cast_in.attrs.get("to")
            if onnx_dtype(biased) != qt:
                raise Rejected(f"the scores are {dtype_name(onnx_dtype(biased))} before the softmax cast, "
                               f"Q is {dtype_name(qt)}", seen)
            if to != F32:
                raise Rejected(f"the softmax island casts to {dtype_name(to)}, not FLOAT", seen)
            if cast_out is None or cast_out.attrs.get("to") != qt:
                got = dtype_name(cast_out.attrs.get("to")) if cast_out is not None else "nothing"
                raise Rejected(f"the fp32 probabilities are cast to {got}, not back to Q's {dtype_name(qt)}", seen)
            _sole(graph, x, seen, "the softmax's fp32 input")
            _sole(graph, softmax.outputs[0], seen, "the fp32 probabilities")
        else:
            if cast_out is not None:
                raise Rejected(f"the probabilities are cast to {dtype_name(cast_out.attrs.get('to'))} with no cast "
                               "into the softmax", seen)
            if onnx_dtype(x) != qt:
                raise Rejected(f"the softmax runs in {dtype_name(onnx_dtype(x))}, Q is {dtype_name(qt)}", seen)
        _sole(graph, probs, seen, "the probabilities")

        # --- the mask ---
        if mask is not None:
            if onnx_dtype(mask) != qt:
                raise Rejected(f"the mask ({mask.name}) is {dtype_name(onnx_dtype(mask))}, not Q's "
                               f"{dtype_name(qt)}", seen)
            # attn_mask must broadcast to [B, H, N, S] as the Add broadcast it, without enlarging
            # the scores: batch and head axes 1 or equal (static), sequence axes 1, equal, or
            # dynamic (the Add then only runs when they agree).
            ms, ss = _shape(mask), _shape(scores)
            if ms is None or len(ms) > 4:
                raise Rejected(f"the mask shape {ms} is not of rank 4 or less", seen)
            ss = ss if ss is not None and len(ss) == 4 else [None] * 4
            for axis, (m_d, s_d) in enumerate(zip(ms[::-1], ss[::-1])):
                axis = 3 - axis
                if m_d == 1 or _same_dim(m_d, s_d):
                    continue
                if axis == 1 and m_d == heads:
                    continue
                if axis >= 2 and not (isinstance(m_d, int) and isinstance(s_d, int)):
                    continue
                raise Rejected(f"the mask shape {ms} is not known to broadcast into the scores {_shape(scores)} "
                               f"(axis {axis}: {m_d} against {s_d})", seen)

        def rewrite():
            y = pv.outputs[0]
            core = [n for n in (qk_mm, tr, scale_node, add if mask is not None else None, cast_in, softmax,
                                cast_out, pv) if n is not None]
            detach(core)
            attrs = {"scale": float(np.float32(scale)), "is_causal": 0}
            inputs = [q, k, v] + ([mask] if mask is not None else [])
            base = softmax.name.rsplit("/", 1)[0] if "/" in softmax.name else softmax.name
            graph.nodes.append(gs.Node("Attention", name=unique_name(graph, f"{base}/Attention"),
                                       attrs=attrs, inputs=inputs, outputs=[y]))
        return rewrite

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _is_qk_scaled(t) -> bool:
        """t is MatMul(...), Mul(MatMul(...), c) or Div(MatMul(...), c): the scores side of the mask Add."""
        p = producer(t)
        if p is None:
            return False
        if p.op == "MatMul":
            return True
        if p.op == "Mul":
            return any(producer_op(i, "MatMul") is not None for i in p.inputs)
        return p.op == "Div" and producer_op(p.inputs[0], "MatMul") is not None

    def _score_chain(self, t):
        """Walk Add/Mul/Div back from the softmax input; the MatMul it reaches, or None."""
        for _ in range(3):
            p = producer(t)
            if p is None:
                return None
            if p.op == "MatMul":
                return p
            if p.op not in ("Add", "Mul", "Div"):
                return None
            mm = [i for i in p.inputs if producer_op(i, "MatMul", "Add", "Mul", "Div") is not None]
            if not mm:
                return None
            t = mm[0]
        return None

    @staticmethod
    def _describe(t) -> str:
        p = producer(t)
        return f"{p.op} ({p.name})" if p is not None else f"the tensor {t.name}"

    def _unrepeat(self, graph, t4, heads, what, seen) -> tuple[gs.Tensor, int]:
        """The [B, KV, S, D] tensor that t4 repeats contiguously to `heads` heads, and the repeat count."""
        tile = producer_op(t4, "Tile")
        if tile is not None:
            reps = ints(tile.inputs[1])
            raise Rejected(f"{what} heads are repeated by {tile.name} (Tile {reps}): tile-style repetition, "
                           f"kv head j serving q heads j, j+KV, ...; Attention repeats each KV head "
                           "contiguously (j*rep .. j*rep+rep-1)", seen + [tile])
        reshape = producer_op(t4, "Reshape")
        expand = producer_op(reshape.inputs[0], "Expand") if reshape is not None else None
        if expand is None:
            h = _shape(t4)[1]
            if not _same_dim(h, heads):
                raise Rejected(f"{what} ({t4.name}) has {h} heads and is not a repetition of KV heads; "
                               f"Q has {heads}", seen)
            return t4, 1  # MHA
        chain = [expand, reshape]
        unsq = producer_op(expand.inputs[0], "Unsqueeze")
        if unsq is None:
            raise Rejected(f"{what} is expanded by {expand.name} from {self._describe(expand.inputs[0])}, "
                           "not from Unsqueeze(kv, axis 2)", seen + chain)
        chain.insert(0, unsq)
        axes = ints(unsq.inputs[1]) if len(unsq.inputs) > 1 else unsq.attrs.get("axes")
        src = unsq.inputs[0]
        if axes is None or len(axes) != 1 or rank(src) != 4 or axes[0] not in (2, -3):
            if axes is not None and len(axes) == 1 and axes[0] in (1, -4):
                raise Rejected(f"{what} heads are repeated on a new axis 1 ({unsq.name}): tile-style order "
                               "(h0, h1, ..., h0, h1, ...); Attention repeats each KV head contiguously", seen + chain)
            raise Rejected(f"{what} is unsqueezed on axes {axes} of a rank-{rank(src)} tensor, not axis 2 of "
                           "[B, KV, S, D]", seen + chain)
        s = _shape(src)
        # Expand to [B, KV, rep, S, D]: the shape operand read as values (a constant, or a Concat of
        # one-element pieces: the sequence length is computed at run time), else the inferred shape.
        e = _values(expand.inputs[1], 5) or _shape(expand.outputs[0])
        if e is None or len(e) != 5:
            raise Rejected(f"{expand.name} does not expand to a known rank-5 [B, KV, rep, S, D]", seen + chain)
        rep = e[2]
        if not isinstance(rep, int) or rep < 1:
            raise Rejected(f"the repeat count of {expand.name} ({rep}) is not static", seen + chain)
        kv = s[1] if isinstance(s[1], int) else e[1]
        if not isinstance(kv, int) or kv < 1:
            raise Rejected(f"the number of {what} heads ({s[1]}) is not static", seen + chain)
        for axis, src_axis in ((0, 0), (1, 1), (3, 2), (4, 3)):
            v, d = e[axis], s[src_axis]
            if v == 1 or _same_dim(v, d) or (v is None and axis == 3 and d != 1):
                continue
            raise Rejected(f"{expand.name} expands {s[:2] + [1] + s[2:]} to {e}: not along the new axis 2 "
                           "only", seen + chain)
        if kv * rep != heads:
            raise Rejected(f"{what} has {kv} heads repeated {rep}x, Q has {heads}", seen + chain)
        # Reshape [B, KV, rep, S, D] -> [B, KV*rep, S, D]: merges axes 1 and 2 and keeps the others.
        r = _values(reshape.inputs[1], 4) or _shape(t4)
        d = s[3] if isinstance(s[3], int) else e[4]
        ok = (r is not None and len(r) == 4 and r[1] == kv * rep and isinstance(d, int) and r[3] == d
              and (r[0] == s[0] or r[0] == e[0]) and isinstance(r[0], int) and r[0] > 0
              and (r[2] is None or r[2] == -1 or _same_dim(r[2], s[2])))
        if not ok:
            raise Rejected(f"{reshape.name} reshapes [B, KV, rep, S, D] = {e} to {r}, not [B, {kv * rep}, S, D]",
                           seen + chain)
        return src, rep


def _values(t: gs.Tensor, n: int) -> list | None:
    """The n int64 values of a shape operand: a constant, or Concat(axis 0) of one-element pieces
    (None where a piece is computed). None if it is neither."""
    v = ints(t)
    if v is not None:
        return v if len(v) == n else None
    cat = producer_op(t, "Concat")
    if cat is None:
        return None
    out = []
    for piece in cat.inputs:
        pv = ints(piece)
        if pv is not None:
            out += pv
        elif piece.shape is not None and list(piece.shape) == [1]:
            out.append(None)
        else:
            return None
    return out if len(out) == n else None


PASS = AttentionPass()
