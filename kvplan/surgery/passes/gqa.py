"""A grouped-query ``Attention`` → attention over the kv heads, each head's query groups as rows.

Matched (what the attention pass writes for a model with fewer kv heads than query heads):

    Y = Attention(Q, K, V[, mask]; scale, is_causal=0)   Q [B, KV*rep, N, D], K/V [B, KV, S, D(v)]

Rewritten:

    Y = Reshape(Attention(Reshape(Q, [0, KV, -1, D]), K, V, tiled mask; scale), [0, KV*rep, -1, Dv])
    tiled mask = Reshape(Expand(Unsqueeze(mask, 2), [1, 1, rep, 1, 1]), [b, 1, -1, S])   from its own shape

Attention's GQA gives query head h the kv head h // rep; Q regrouped as [KV, rep*N] rows gives kv
head j exactly those query heads' rows (row r*N + n is query head j*rep + r's token n), and the
mask, the same for every head, is repeated once per query group in the same order. Every score,
softmax and output row is the one the grouped form computes (a kernel may sum the longer row
blocks in another order: fp32 ulps in ONNX Runtime; SmolLM2-135M's fp16 outputs were identical).

Why: TensorRT-RTX repeats K and V up to the query heads inside the kernels that write the cache,
and stores those kernels' CUDA source in the plan once per call (SmolLM2-135M int4: two kernels,
58 copies each, 17.7 MiB of an 86.2 MiB plan); attention over the kv heads repeats nothing.

A causal Attention (its causal mask follows query positions, which regrouping moves), more inputs
or outputs than these, other attributes, a mask that differs between heads, or a rank other than
4 is a near miss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvplan.lazy import lazy_import
from kvplan.surgery.framework import Pass
from kvplan.surgery.graphutil import int_constant, rank, unique_name
from kvplan.surgery.pattern import Match

gs = lazy_import("onnx_graphsurgeon")

PATTERN = "the attention, so its query heads cannot be regrouped"
KEPT_ATTRS = {"scale", "is_causal"}


@dataclass
class Grouped:
    """What the rewrite needs of one grouped-query Attention."""
    node: gs.Node
    kv_heads: int
    rep: int
    head_dim: int
    v_dim: int


class GQAPass(Pass):
    name = "gqa"
    summary = "grouped-query Attention → Attention over the kv heads with the query groups as rows"

    def __init__(self):
        # One tiled mask per distinct mask and group size, shared by every layer's Attention.
        self._tiled: dict[tuple[int, int], tuple[gs.Tensor, gs.Tensor]] = {}

    def reset(self):
        self._tiled = {}

    def candidates(self, graph):
        for n in graph.nodes:
            if n.op != "Attention" or len(n.inputs) < 3:
                continue
            hq, hkv = _heads(n.inputs[0]), _heads(n.inputs[1])
            if hq and hkv and hq != hkv:
                yield n

    def match(self, graph, node):
        q, k, v = node.inputs[:3]
        m = Match(graph, PATTERN, [node])
        if any(rank(t) != 4 for t in (q, k, v)):
            m.reject(f"Q, K and V have ranks {[rank(t) for t in (q, k, v)]}, not 4")
        if len(node.inputs) > 4 or len(node.outputs) != 1:
            m.reject(f"the Attention has {len(node.inputs)} inputs and {len(node.outputs)} outputs "
                     "(past/present caches or scores), not Q, K, V, mask and Y")
        extra = sorted(set(node.attrs) - KEPT_ATTRS)
        if extra:
            m.reject(f"the Attention has attributes {extra} the regrouped form does not carry over")
        if node.attrs.get("is_causal", 0):
            m.reject("the Attention is causal (is_causal=1): its mask follows query positions, which regrouping "
                     "moves")
        hq, hkv = _heads(q), _heads(k)
        if _heads(v) != hkv or hq % hkv:
            m.reject(f"{hq} query heads are not groups of the {hkv} kv heads (V has {_heads(v)})")
        d, dv = q.shape[3], v.shape[3]
        if not (isinstance(d, int) and isinstance(dv, int) and k.shape[3] == d):
            m.reject(f"the head sizes are not static and equal for Q and K ({q.shape}, {k.shape}, {v.shape})")
        mask = _mask(node)
        if mask is not None:
            if rank(mask) != 4 or mask.shape[1] != 1:
                m.reject(f"the mask {mask.name} {mask.shape} is not one [B or 1, 1, N, S] mask for every head")
        found = Grouped(node, hkv, hq // hkv, d, dv)
        return lambda: self._rewrite(graph, found)

    def _rewrite(self, graph: gs.Graph, g: Grouped) -> None:
        node = g.node
        q, y = node.inputs[0], node.outputs[0]
        base = node.name
        rows = gs.Variable(unique_name(graph, f"{base}/query_groups"), dtype=q.dtype, shape=None)
        graph.nodes.append(gs.Node("Reshape", name=unique_name(graph, f"{base}/query_groups"),
                                   inputs=[q, int_constant(graph, f"{base}/query_groups_shape", [0, g.kv_heads, -1, g.head_dim])],
                                   outputs=[rows]))
        node.inputs[0] = rows
        mask = _mask(node)
        if mask is not None:
            node.inputs[3] = self._tiled_mask(graph, mask, g.rep)
        grouped = gs.Variable(unique_name(graph, f"{base}/grouped"), dtype=y.dtype, shape=None)
        node.outputs[0] = grouped
        graph.nodes.append(gs.Node("Reshape", name=unique_name(graph, f"{base}/query_heads"),
                                   inputs=[grouped, int_constant(graph, f"{base}/query_heads_shape",
                                                          [0, g.kv_heads * g.rep, -1, g.v_dim])],
                                   outputs=[y]))

    def _tiled_mask(self, graph: gs.Graph, mask: gs.Tensor, rep: int) -> gs.Tensor:
        """``mask`` [b, 1, N, S] repeated ``rep`` times along its query axis; once per mask and group size."""
        key = (id(mask), rep)
        if key in self._tiled:
            return self._tiled[key][1]
        base = unique_name(graph, f"{mask.name}/tiled{rep}")
        v = {k: gs.Variable(f"{base}/{k}", dtype=np.int64 if k in ("shape", "lead", "keys", "to") else mask.dtype,
                            shape=None) for k in ("lifted", "expanded", "shape", "lead", "keys", "to")}
        tiled = gs.Variable(base, dtype=mask.dtype, shape=None)
        # [b, 1, N, S] -> [b, 1, rep, N, S] -> [b, 1, rep*N, S]; the target shape from the mask's own,
        # since Reshape's 0 would copy the 5-D tensor's axis 3 (N), not S.
        graph.nodes += [
            gs.Node("Unsqueeze", name=f"{base}/Unsqueeze", inputs=[mask, int_constant(graph, f"{base}/axis", [2])],
                    outputs=[v["lifted"]]),
            gs.Node("Expand", name=f"{base}/Expand", outputs=[v["expanded"]],
                    inputs=[v["lifted"], int_constant(graph, f"{base}/groups", [1, 1, rep, 1, 1])]),
            gs.Node("Shape", name=f"{base}/Shape", inputs=[mask], outputs=[v["shape"]]),
            gs.Node("Slice", name=f"{base}/lead", outputs=[v["lead"]],
                    inputs=[v["shape"], int_constant(graph, f"{base}/zero", [0]), int_constant(graph, f"{base}/two", [2])]),
            gs.Node("Slice", name=f"{base}/keys", outputs=[v["keys"]],
                    inputs=[v["shape"], int_constant(graph, f"{base}/three", [3]), int_constant(graph, f"{base}/four", [4])]),
            gs.Node("Concat", name=f"{base}/to", attrs={"axis": 0}, outputs=[v["to"]],
                    inputs=[v["lead"], int_constant(graph, f"{base}/rows", [-1]), v["keys"]]),
            gs.Node("Reshape", name=f"{base}/Reshape", inputs=[v["expanded"], v["to"]], outputs=[tiled]),
        ]
        self._tiled[key] = (mask, tiled)   # the mask kept alive: its id stays its own
        return tiled


def _mask(node: gs.Node) -> gs.Tensor | None:
    """The Attention's mask, or None where it has none (an absent optional input has no name)."""
    mask = node.inputs[3] if len(node.inputs) == 4 else None
    return mask if mask is not None and mask.name else None


def _heads(t: gs.Tensor) -> int | None:
    """The static size of axis 1 (heads) of a rank-4 tensor."""
    if t is None or t.shape is None or len(t.shape) != 4 or not isinstance(t.shape[1], int) or t.shape[1] <= 0:
        return None
    return t.shape[1]


PASS = GQAPass()
