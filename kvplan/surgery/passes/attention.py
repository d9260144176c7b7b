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
    onnx_dtype,
    other_input,
    producer,
    producer_op,
    rank,
    same_dim,
    unique_name,
)
from kvplan.surgery.pattern import Match

onnx = lazy_import("onnx")
gs = lazy_import("onnx_graphsurgeon")

F32 = 1                     # onnx.TensorProto.FLOAT (the ONNX standard's number)


def _shape(t: gs.Tensor) -> list | None:
    return list(t.shape) if t.shape is not None else None


PATTERN = "the attention pattern"


@dataclass
class Softmax:
    """The softmax and its optional fp32 island: biased -> [Cast] -> x -> Softmax -> [Cast] -> probs -> pv."""
    node: gs.Node
    biased: gs.Tensor
    x: gs.Tensor
    probs: gs.Tensor
    pv: gs.Node
    cast_in: gs.Node | None
    cast_out: gs.Node | None


@dataclass
class Scores:
    """scores = MatMul(Q, K^T) [* scale]; biased = scores [+ mask]."""
    qk_mm: gs.Node
    scale_node: gs.Node | None
    scale: float
    add: gs.Node | None
    mask: gs.Tensor | None
    scores: gs.Tensor


@dataclass
class Operands:
    """Attention's Q, K, V ([B, KV, S, D] after undoing the GQA repetition) and K's transpose."""
    q: gs.Tensor
    k: gs.Tensor
    v: gs.Tensor
    transpose: gs.Node
    heads: int


class AttentionPass(Pass):
    name = "attention"
    summary = "MatMul/scale/mask/Softmax/MatMul attention (MHA, GQA) → Attention (opset 23)"

    def candidates(self, graph):
        for n in graph.nodes:
            if n.op == "Softmax":
                yield n

    def match(self, graph, softmax):
        # pattern: the softmax island, the scores that feed it, Q/K/V behind them;
        # check: precision, then the mask; rewrite: one Attention node.
        m = Match(graph, PATTERN, [softmax])
        sm = self._softmax(m, softmax)
        if sm is None:
            return None  # a softmax that neither reads QK^T nor feeds ·V: not attention
        sc = self._scores(m, sm.biased)
        ops = self._operands(m, sc.qk_mm, sm.pv)
        self._precision(m, sm, onnx_dtype(ops.q))
        m.sole(sm.probs, "the probabilities")
        if sc.mask is not None:
            self._mask_broadcasts(m, sc.mask, sc.scores, ops)
        return lambda: self._rewrite(graph, sm, sc, ops)

    # ---------------------------------------------------------------- pattern

    def _softmax(self, m: Match, softmax: gs.Node) -> Softmax | None:
        x = softmax.inputs[0]
        cast_in = producer_op(x, "Cast")
        biased = cast_in.inputs[0] if cast_in is not None else x
        probs = softmax.outputs[0]
        cast_out = None
        if len(probs.outputs) == 1 and probs.outputs[0].op == "Cast" and probs not in m.graph.outputs:
            cast_out = probs.outputs[0]
            probs = cast_out.outputs[0]
        pv = probs.outputs[0] if len(probs.outputs) == 1 else None
        if self._score_chain(biased) is None and (pv is None or pv.op != "MatMul"):
            return None
        if cast_in is not None:
            m.before(cast_in)
        if cast_out is not None:
            m.after(cast_out)
        if pv is not None:
            m.after(pv)
        axis = softmax.attrs.get("axis", -1)
        if not is_last_axis(axis, softmax.inputs[0]):
            m.reject(f"Softmax over axis {axis}, not the last axis (the only one Attention normalises)")
        if pv is None or pv.op != "MatMul" or pv.inputs[0] is not probs:
            if pv is None:
                readers = ", ".join(f"{n.op} {n.name}" for n in probs.outputs[:3]) or "no node"
                what = f"{len(probs.outputs)} nodes ({readers})" if probs.outputs else "nothing else"
            else:
                what = f"{pv.op} ({pv.name})" if pv.op != "MatMul" else \
                    f"MatMul ({pv.name}) as its second operand"
            m.reject(f"the probabilities ({probs.name}) feed {what}, not MatMul(probs, V) alone")
        return Softmax(softmax, biased, x, probs, pv, cast_in, cast_out)

    def _scores(self, m: Match, biased: gs.Tensor) -> Scores:
        """[Add(mask)] after [Mul|Div(scale)] after MatMul(Q, Transpose(K))."""
        add, mask, scores = producer_op(biased, "Add"), None, biased
        if add is not None and (self._is_qk_scaled(add.inputs[0]) or self._is_qk_scaled(add.inputs[1])):
            m.before(add)
            scores = add.inputs[0] if self._is_qk_scaled(add.inputs[0]) else add.inputs[1]
            mask = other_input(add, scores)
        elif add is not None and (tanh := next(filter(None, map(self._softcap, add.inputs)), None)) is not None:
            m.before(add)
            m.reject(f"soft-capped logits: {add.name} adds the mask to cap * Tanh(scores / cap) ({tanh.name}); "
                     "ONNX Attention applies its softcap after adding the mask, which would no longer mask, so "
                     "the capped attention is left unfused", tanh)
        elif add is not None and any(producer_op(i, "Mul", "Div") is not None for i in add.inputs):
            m.before(add)
            m.reject(f"{add.name} adds the mask to something that is not scale * MatMul(Q, K^T)")
        scale_node = producer_op(scores, "Mul", "Div")
        if scale_node is None:
            qk_mm = producer_op(scores, "MatMul")
            if qk_mm is None:
                m.reject(f"the softmax input is {self._describe(scores)}, not (Q K^T) * scale [+ mask]")
            scale = 1.0  # no scaling in the graph: Attention must not apply its default 1/sqrt(D)
            m.before(qk_mm)
        else:
            m.before(scale_node)
            qk_mm, scale = self._scale(m, scale_node)
            m.sole(qk_mm.outputs[0], "Q K^T")
        if mask is not None or scale_node is not None:
            m.sole(scores, "the scaled scores")
        if mask is not None:
            m.sole(biased, "the masked scores")
        return Scores(qk_mm, scale_node, scale, add, mask, scores)

    def _scale(self, m: Match, scale_node: gs.Node) -> tuple[gs.Node, float]:
        """The MatMul(Q, K^T) a constant scalar Mul/Div scales, and the scale it applies."""
        data = [i for i in scale_node.inputs if producer_op(i, "MatMul") is not None]
        if scale_node.op == "Div":
            data = data[:1] if data and scale_node.inputs[0] is data[0] else []
        if not data:
            inner = producer_op(scale_node.inputs[0], "Add") or producer_op(scale_node.inputs[1], "Add")
            if inner is not None and any(producer_op(i, "MatMul") is not None for i in inner.inputs):
                m.before(inner)
                m.reject(f"the mask is added before scaling ({inner.name} then {scale_node.name}); "
                         "Attention adds attn_mask after scaling QK^T")
            m.reject(f"{scale_node.name} does not scale a MatMul(Q, K^T)")
        qk_mm = m.before(producer(data[0]))
        s_t = other_input(scale_node, data[0])
        sv = const_value(s_t)
        if sv is None:
            m.reject(f"the scale ({s_t.name}) is not a constant")
        if sv.size != 1:
            m.reject(f"the scale ({s_t.name}) has shape {list(sv.shape)}, not one value: "
                     "Attention applies one scale to every head and position")
        c = float(sv.reshape(-1)[0])
        scale = 1.0 / c if scale_node.op == "Div" and c != 0 else c
        if not math.isfinite(scale) or scale <= 0:
            m.reject(f"the scale {c} ({scale_node.op}) is not a finite positive number")
        return qk_mm, scale

    def _operands(self, m: Match, qk_mm: gs.Node, pv: gs.Node) -> Operands:
        """Q, Transpose(K) and V of the two MatMuls, K and V with their GQA repetition undone."""
        q, kt = qk_mm.inputs
        tr = producer_op(kt, "Transpose")
        if tr is None or tr.attrs.get("perm") not in ([0, 1, 3, 2],):
            perm = tr.attrs.get("perm") if tr is not None else None
            m.reject(f"the second operand of {qk_mm.name} is {self._describe(kt)}"
                     f"{f' with perm {list(perm)}' if perm is not None else ''}, not Transpose(K, [0, 1, 3, 2])")
        m.before(tr)
        m.sole(kt, "K^T")
        k4, v4 = tr.inputs[0], pv.inputs[1]
        for t, what in ((q, "Q"), (k4, "K"), (v4, "V")):
            if rank(t) != 4:
                m.reject(f"{what} ({t.name}) has rank {rank(t)}, not 4 ([batch, heads, seq, head_dim])")
        qt = onnx_dtype(q)
        for t, what in ((k4, "K"), (v4, "V")):
            if onnx_dtype(t) != qt:
                m.reject(f"{what} is {dtype_name(onnx_dtype(t))}, Q is {dtype_name(qt)}")
        # Sequence lengths and head sizes need no check: the graph's own MatMuls only run when
        # they agree, and Attention requires the same. Head counts decide the GQA grouping.
        heads = _shape(q)[1]
        if not isinstance(heads, int) or heads <= 0:
            m.reject(f"the number of query heads of {q.name} ({heads}) is not static")
        k, k_rep = self._unrepeat(m, k4, heads, "K")
        v, v_rep = self._unrepeat(m, v4, heads, "V")
        if k_rep != v_rep:
            m.reject(f"K is repeated {k_rep}x, V {v_rep}x")
        return Operands(q, k, v, tr, heads)

    # ---------------------------------------------------------------- checks

    def _precision(self, m: Match, sm: Softmax, qt: int | None) -> None:
        """An fp32 island casts from Q's dtype to FLOAT and back; without one, the softmax runs in Q's dtype."""
        if sm.cast_in is not None:
            to = sm.cast_in.attrs.get("to")
            if onnx_dtype(sm.biased) != qt:
                m.reject(f"the scores are {dtype_name(onnx_dtype(sm.biased))} before the softmax cast, "
                         f"Q is {dtype_name(qt)}")
            if to != F32:
                m.reject(f"the softmax island casts to {dtype_name(to)}, not FLOAT")
            if sm.cast_out is None or sm.cast_out.attrs.get("to") != qt:
                got = dtype_name(sm.cast_out.attrs.get("to")) if sm.cast_out is not None else "nothing"
                m.reject(f"the fp32 probabilities are cast to {got}, not back to Q's {dtype_name(qt)}")
            m.sole(sm.x, "the softmax's fp32 input")
            m.sole(sm.node.outputs[0], "the fp32 probabilities")
        else:
            if sm.cast_out is not None:
                m.reject(f"the probabilities are cast to {dtype_name(sm.cast_out.attrs.get('to'))} with no cast "
                         "into the softmax")
            if onnx_dtype(sm.x) != qt:
                m.reject(f"the softmax runs in {dtype_name(onnx_dtype(sm.x))}, Q is {dtype_name(qt)}")

    def _mask_broadcasts(self, m: Match, mask: gs.Tensor, scores: gs.Tensor, ops: Operands) -> None:
        """attn_mask must broadcast to [B, H, N, S] as the Add broadcast it, without enlarging the
        scores: batch and head axes 1 or equal (equal ints, or the same symbol: a dynamic batch
        "B"), sequence axes 1, equal, or dynamic (the Add then only runs when they agree)."""
        qt = onnx_dtype(ops.q)
        if onnx_dtype(mask) != qt:
            m.reject(f"the mask ({mask.name}) is {dtype_name(onnx_dtype(mask))}, not Q's {dtype_name(qt)}")
        ms, ss = _shape(mask), _shape(scores)
        if ms is None or len(ms) > 4:
            m.reject(f"the mask shape {ms} is not of rank 4 or less")
        ss = ss if ss is not None and len(ss) == 4 else [None] * 4
        for axis, (m_d, s_d) in enumerate(zip(ms[::-1], ss[::-1])):
            axis = 3 - axis
            if m_d == 1 or same_dim(m_d, s_d):
                continue
            if axis == 1 and m_d == ops.heads:
                continue
            if axis >= 2 and not (isinstance(m_d, int) and isinstance(s_d, int)):
                continue
            m.reject(f"the mask shape {ms} is not known to broadcast into the scores {_shape(scores)} "
                     f"(axis {axis}: {m_d} against {s_d})")

    # ---------------------------------------------------------------- rewrite

    @staticmethod
    def _rewrite(graph: gs.Graph, sm: Softmax, sc: Scores, ops: Operands) -> None:
        y = sm.pv.outputs[0]
        core = [n for n in (sc.qk_mm, ops.transpose, sc.scale_node, sc.add if sc.mask is not None else None,
                            sm.cast_in, sm.node, sm.cast_out, sm.pv) if n is not None]
        detach(core)
        attrs = {"scale": float(np.float32(sc.scale)), "is_causal": 0}
        inputs = [ops.q, ops.k, ops.v] + ([sc.mask] if sc.mask is not None else [])
        base = sm.node.name.rsplit("/", 1)[0] if "/" in sm.node.name else sm.node.name
        graph.nodes.append(gs.Node("Attention", name=unique_name(graph, f"{base}/Attention"),
                                   attrs=attrs, inputs=inputs, outputs=[y]))

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
    def _softcap(t) -> gs.Node | None:
        """The Tanh of cap * Tanh(x / cap) (Gemma 2's soft-capped logits) when t is that, else None."""
        mul = producer_op(t, "Mul")
        if mul is None:
            return None
        return next((n for n in map(lambda i: producer_op(i, "Tanh"), mul.inputs) if n is not None), None)

    @staticmethod
    def _describe(t) -> str:
        p = producer(t)
        return f"{p.op} ({p.name})" if p is not None else f"the tensor {t.name}"

    def _unrepeat(self, m: Match, t4, heads, what) -> tuple[gs.Tensor, int]:
        """The [B, KV, S, D] tensor that t4 repeats contiguously to `heads` heads, and the repeat count."""
        tile = producer_op(t4, "Tile")
        if tile is not None:
            reps = ints(tile.inputs[1])
            m.reject(f"{what} heads are repeated by {tile.name} (Tile {reps}): tile-style repetition, "
                     f"kv head j serving q heads j, j+KV, ...; Attention repeats each KV head "
                     "contiguously (j*rep .. j*rep+rep-1)", tile)
        reshape = producer_op(t4, "Reshape")
        expand = producer_op(reshape.inputs[0], "Expand") if reshape is not None else None
        if expand is None:
            h = _shape(t4)[1]
            if not same_dim(h, heads):
                m.reject(f"{what} ({t4.name}) has {h} heads and is not a repetition of KV heads; "
                         f"Q has {heads}")
            return t4, 1  # MHA
        chain = [expand, reshape]
        unsq = producer_op(expand.inputs[0], "Unsqueeze")
        if unsq is None:
            m.reject(f"{what} is expanded by {expand.name} from {self._describe(expand.inputs[0])}, "
                     "not from Unsqueeze(kv, axis 2)", *chain)
        chain.insert(0, unsq)
        axes = ints(unsq.inputs[1]) if len(unsq.inputs) > 1 else unsq.attrs.get("axes")
        src = unsq.inputs[0]
        if axes is None or len(axes) != 1 or rank(src) != 4 or axes[0] not in (2, -3):
            if axes is not None and len(axes) == 1 and axes[0] in (1, -4):
                m.reject(f"{what} heads are repeated on a new axis 1 ({unsq.name}): tile-style order "
                         "(h0, h1, ..., h0, h1, ...); Attention repeats each KV head contiguously", *chain)
            m.reject(f"{what} is unsqueezed on axes {axes} of a rank-{rank(src)} tensor, not axis 2 of "
                     "[B, KV, S, D]", *chain)
        s = _shape(src)
        # Expand to [B, KV, rep, S, D]: the shape operand read as values (a constant, or a Concat of
        # one-element pieces: the sequence length is computed at run time), else the inferred shape.
        e = _values(expand.inputs[1], 5) or _shape(expand.outputs[0])
        if e is None or len(e) != 5:
            m.reject(f"{expand.name} does not expand to a known rank-5 [B, KV, rep, S, D]", *chain)
        rep = e[2]
        if not isinstance(rep, int) or rep < 1:
            m.reject(f"the repeat count of {expand.name} ({rep}) is not static", *chain)
        kv = s[1] if isinstance(s[1], int) else e[1]
        if not isinstance(kv, int) or kv < 1:
            m.reject(f"the number of {what} heads ({s[1]}) is not static", *chain)
        for axis, src_axis in ((0, 0), (1, 1), (3, 2), (4, 3)):
            v, d = e[axis], s[src_axis]
            if v is None and axis == 0:
                # A dynamic batch: the size is read off an input's shape at run time; that
                # input's own batch axis says which it is.
                v = _shape_piece(expand.inputs[1], axis)
            if v == 1 or same_dim(v, d) or (v is None and axis == 3 and d != 1):
                continue
            m.reject(f"{expand.name} expands {s[:2] + [1] + s[2:]} to {e}: not along the new axis 2 "
                     "only", *chain)
        if kv * rep != heads:
            m.reject(f"{what} has {kv} heads repeated {rep}x, Q has {heads}", *chain)
        # Reshape [B, KV, rep, S, D] -> [B, KV*rep, S, D]: merges axes 1 and 2 and keeps the others.
        r = _values(reshape.inputs[1], 4) or _shape(t4)
        d = s[3] if isinstance(s[3], int) else e[4]
        # A dynamic batch is read off an input's shape at run time, as in the Expand above.
        b = r[0] if r is None or len(r) != 4 or r[0] is not None else _shape_piece(reshape.inputs[1], 0)
        ok = (r is not None and len(r) == 4 and r[1] == kv * rep and isinstance(d, int) and r[3] == d
              and ((b == s[0] or b == e[0]) and isinstance(b, int) and b > 0
                   or isinstance(b, str) and same_dim(b, s[0]))
              and (r[2] is None or r[2] == -1 or same_dim(r[2], s[2])))
        if not ok:
            m.reject(f"{reshape.name} reshapes [B, KV, rep, S, D] = {e} to {r}, not [B, {kv * rep}, S, D]", *chain)
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


def _shape_piece(t: gs.Tensor, index: int):
    """Piece ``index`` of a Concat shape operand when it is Shape(x, start=k, end=k+1): the dim x
    has on axis k (a symbol such as "B", or an int); None otherwise."""
    cat = producer_op(t, "Concat")
    if cat is None or index >= len(cat.inputs):
        return None
    shape = producer_op(cat.inputs[index], "Shape")
    if shape is None or shape.inputs[0].shape is None:
        return None
    dims = list(shape.inputs[0].shape)
    start = shape.attrs.get("start", 0)
    end = shape.attrs.get("end", len(dims))
    start, end = (start + len(dims) if start < 0 else start), (end + len(dims) if end < 0 else end)
    return dims[start] if end == start + 1 and 0 <= start < len(dims) else None


PASS = AttentionPass()
