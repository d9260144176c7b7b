"""Rotary embedding (rotate_half convention) on q and k → one opset-23 ``RotaryEmbedding`` node each.

Matched spelling, x of shape [B, heads, S, D]:

    rot = Concat(Neg(Slice(x, D/2:D)), Slice(x, 0:D/2), axis=-1)
    y   = Add(Mul(x, cos), Mul(rot, sin))
    cos = Unsqueeze(g(Cos(Concat(f, f, axis=-1))), axis=1)   g: Cast / Mul by a scalar, in any order
    sin = likewise with Sin

Choice of caches: the fused node takes the graph's own cos/sin, sliced to their
first half ([B, S, D/2], no position_ids input), not cos/sin tables baked into
initializers and indexed by position_ids. The graph's cos/sin already carry the
model's exact rope scaling (linear, llama3, attention scaling) and precision,
whatever computed them, so numerics stay bit-identical to the unfused graph and
no maximum-position cap is baked into the file. The half-slice is only right when
the last axis is a duplicated Concat(f, f) (cos[..., :D/2] == cos[..., D/2:]),
so that is verified structurally for every cache before a node is fused.
Cheaper slice: one Slice per distinct cos/sin tensor, shared by every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from kvplan.lazy import lazy_import
from kvplan.surgery.framework import Pass
from kvplan.surgery.graphutil import (
    const_value,
    detach,
    dtype_name,
    int_constant,
    ints,
    is_last_axis,
    last_dim,
    onnx_dtype,
    other_input,
    producer,
    producer_op,
    rank,
    unique_name,
)
from kvplan.surgery.pattern import Match

gs = lazy_import("onnx_graphsurgeon")

PATTERN = "the rotary pattern"


@dataclass
class HalfCache:
    """A cos or sin cache whose first half is the whole of it: slice ``source`` [B, S, D] to ``half``."""
    source: gs.Tensor
    half: int


@dataclass
class Rotary:
    """What the rewrite needs of one matched rotary: y = x * cos + rotate_half(x) * sin."""
    x: gs.Tensor
    cos: HalfCache
    sin: HalfCache
    removed: list[gs.Node]
    add: gs.Node            # its output becomes the fused node's


def _slice_range(m: Match, node: gs.Node, x: gs.Tensor, d: int) -> tuple[int, int, int] | None:
    """(start, end, step) of a Slice over x's last axis, normalised to [0, d]; None if not such a slice."""
    inputs = node.inputs
    starts, ends = ints(inputs[1]), ints(inputs[2])
    axes = ints(inputs[3]) if len(inputs) > 3 and inputs[3].name else [-1]
    steps = ints(inputs[4]) if len(inputs) > 4 and inputs[4].name else [1]
    if starts is None or ends is None or axes is None or steps is None:
        m.reject(f"Slice {node.name} has non-constant bounds")
    if len(axes) != 1 or not is_last_axis(axes[0], x):
        return None

    def norm(v: int) -> int:
        if v < 0:
            v += d
        return min(max(v, 0), d)
    return norm(starts[0]), norm(ends[0]), steps[0]


class RoPEPass(Pass):
    name = "rope"
    summary = "rotate_half rotary embedding on q/k → RotaryEmbedding (opset 23)"

    def candidates(self, graph):
        # Negating a slice is the distinctive half of rotate_half; interleaved and
        # reversed-sign variants share it, so they surface as near misses.
        for n in graph.nodes:
            if n.op == "Neg" and producer_op(n.inputs[0], "Slice") is not None:
                yield n

    def __init__(self):
        # One half-Slice per distinct cos/sin tensor, shared by every layer's fused node.
        self._halves: dict[int, tuple[gs.Tensor, gs.Tensor]] = {}   # id(source) -> (source, half)

    def reset(self):
        self._halves = {}

    def match(self, graph, neg):
        s_hi = producer(neg.inputs[0])
        x = s_hi.inputs[0]
        m = Match(graph, PATTERN, [s_hi, neg])
        d = last_dim(x)
        if d is None:
            m.reject(f"the head size of {x.name} is not static")
        hi = _slice_range(m, s_hi, x, d)
        if hi is None:
            return None  # a slice over another axis: not rotary
        if hi[2] != 1:
            m.reject(f"interleaved rotary (slice step {hi[2]}) is not fused: only the "
                     "rotate_half convention (interleaved=0) is")
        cat, s_lo = self._rotate_half(m, neg, x, d, hi)
        m_sin, m_cos, add, sin, cos = self._combine(m, cat, x)
        self._layout(m, x, d)
        found = Rotary(x, self._half_cache(m, cos, "Cos", d, x), self._half_cache(m, sin, "Sin", d, x),
                       [s_hi, neg, s_lo, cat, m_sin, m_cos, add], add)
        return lambda: self._rewrite(graph, found)

    # --- checks, in the order the pattern is walked ---

    @staticmethod
    def _rotate_half(m: Match, neg, x, d: int, hi) -> tuple[gs.Node, gs.Node]:
        """Concat(-x[D/2:], x[:D/2]) on the last axis; returns (the Concat, the unnegated half's Slice)."""
        cat = m.after(m.sole(neg.outputs[0], "the negated half"))
        if cat.op != "Concat" or not is_last_axis(cat.attrs.get("axis", 0), x) or len(cat.inputs) != 2:
            m.reject(f"the negated half feeds {cat.op}, not a two-input Concat on the last axis "
                     "(interleaved rotary?)")
        if cat.inputs[0] is not neg.outputs[0]:
            m.reject("the negated half is the second Concat operand: reversed-sign rotation, not rotate_half")
        s_lo = producer_op(cat.inputs[1], "Slice")
        if s_lo is None or s_lo.inputs[0] is not x:
            m.reject("the other Concat operand is not a slice of the same tensor")
        m.before(s_lo)
        lo = _slice_range(m, s_lo, x, d)
        if lo is None or lo[2] != 1:
            m.reject("the other half is not a unit-step slice on the last axis")
        half = d // 2
        if d % 2 or hi[:2] != (half, d) or lo[:2] != (0, half):
            if hi[:2] == (0, half) and lo[:2] == (half, d):
                m.reject("the first half is negated instead of the second: not rotate_half")
            m.reject(f"halves {lo[:2]} and {hi[:2]} do not split head size {d} in two")
        m.sole(s_lo.outputs[0], "the unnegated half")
        return cat, s_lo

    @staticmethod
    def _combine(m: Match, cat, x):
        """y = x * cos + rotate_half(x) * sin; returns (Mul(sin), Mul(cos), Add, sin, cos)."""
        m_sin = m.after(m.sole(cat.outputs[0], "rotate_half(x)"))
        if m_sin.op != "Mul":
            m.reject(f"rotate_half(x) feeds {m_sin.op}, not Mul(sin)")
        sin = other_input(m_sin, cat.outputs[0])
        add = m.after(m.sole(m_sin.outputs[0], "rotate_half(x) * sin"))
        if add.op != "Add":
            m.reject(f"rotate_half(x) * sin feeds {add.op}, not Add")
        m_cos = producer_op(other_input(add, m_sin.outputs[0]), "Mul")
        if m_cos is None or x not in m_cos.inputs:
            m.reject("the other addend is not x * cos")
        m.ahead_of(add, m_cos)
        m.sole(m_cos.outputs[0], "x * cos")
        cos = other_input(m_cos, x)
        if cos is x:
            m.reject("x * x is not x * cos")
        return m_sin, m_cos, add, sin, cos

    @staticmethod
    def _layout(m: Match, x, d: int) -> None:
        """x is [B, heads, S, D], rotated over the whole head (no partial rotary)."""
        if rank(x) != 4:
            m.reject(f"x has rank {rank(x)}, not 4 ([batch, heads, seq, head_dim])")
        part = producer_op(x, "Slice")
        if part is not None:
            src_d = last_dim(part.inputs[0])
            rng = _slice_range(m, part, part.inputs[0], src_d) if src_d is not None else None
            if rng is not None and src_d != d:
                m.reject(f"partial rotary (rotary dim {d} of head dim {src_d}) is not fused", part)

    @staticmethod
    def _half_cache(m: Match, t, trig: str, d: int, x) -> HalfCache:
        """Check that t is Unsqueeze(axis 1) of a duplicated cos/sin; return how to slice its first half."""
        what = trig.lower()
        if onnx_dtype(t) != onnx_dtype(x):
            m.reject(f"{what} is {dtype_name(onnx_dtype(t))}, x is {dtype_name(onnx_dtype(x))}")
        node, unsq = producer(t), None
        while node is not None and node.op != trig:
            if node.op == "Unsqueeze" and unsq is None:
                axes = ints(node.inputs[1]) if len(node.inputs) > 1 else node.attrs.get("axes")
                if axes is None or len(axes) != 1 or axes[0] not in (1, -3) or rank(node.outputs[0]) not in (4, None):
                    m.reject(f"{what} is unsqueezed on axes {axes}, not axis 1 ([B, 1, S, D] "
                             "against x [B, heads, S, D])")
                unsq = node
            elif node.op in ("Mul", "Div") and any(
                    (v := const_value(i)) is not None and v.size == 1 for i in node.inputs):
                pass  # attention scaling: elementwise by a scalar, commutes with slicing
            elif node.op not in ("Cast", "Identity"):
                m.reject(f"{what} is computed by {node.op} ({node.name}), not an elementwise chain from {trig}")
            data = [i for i in node.inputs if const_value(i) is None] if node.op in ("Mul", "Div") else node.inputs[:1]
            if len(data) != 1:
                m.reject(f"{what} path through {node.name} has no single data input")
            node = producer(data[0])
        if node is None:
            m.reject(f"{what} does not come from a {trig} node")
        if unsq is None:
            m.reject(f"{what} has no Unsqueeze(axis 1): its layout cannot be checked")
        cat = producer_op(node.inputs[0], "Concat")
        if (cat is None or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1]
                or not is_last_axis(cat.attrs.get("axis", 0), cat.outputs[0])):
            m.reject(f"{trig}'s angles are not Concat(f, f) on the last axis, so the first half of "
                     f"{what} is not the whole of it")
        full = last_dim(cat.outputs[0])
        if full is not None and full != d:
            m.reject(f"{what} has last dim {full}, head size is {d}")
        # Slice the [B, S, D] tensor the Unsqueeze reads: it is the same values without the heads axis.
        return HalfCache(unsq.inputs[0], d // 2)

    # --- the rewrite ---

    def _rewrite(self, graph: gs.Graph, r: Rotary) -> None:
        y = r.add.outputs[0]
        detach(r.removed)
        c, s = self._materialise(graph, r.cos), self._materialise(graph, r.sin)
        base = r.add.name.rsplit("/", 1)[0] if "/" in r.add.name else r.add.name
        graph.nodes.append(gs.Node(
            "RotaryEmbedding", name=unique_name(graph, f"{base}/RotaryEmbedding"),
            attrs={"interleaved": 0}, inputs=[r.x, c, s], outputs=[y]))

    def _materialise(self, graph: gs.Graph, cache: HalfCache) -> gs.Tensor:
        src = cache.source
        if id(src) in self._halves:
            return self._halves[id(src)][1]
        name = unique_name(graph, f"{src.name}_half")
        out = gs.Variable(name, dtype=src.dtype,
                          shape=list(src.shape[:-1]) + [cache.half] if src.shape is not None else None)
        consts = [int_constant(graph, f"{name}_{k}", [v])
                  for k, v in (("starts", 0), ("ends", cache.half), ("axes", -1))]
        graph.nodes.append(gs.Node("Slice", name=unique_name(graph, f"{name}/Slice"),
                                   inputs=[src, *consts], outputs=[out]))
        self._halves[id(src)] = (src, out)   # the source kept alive: its id stays its own
        return out


PASS = RoPEPass()
