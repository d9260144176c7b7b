"""Small onnx-graphsurgeon helpers shared by the passes."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from kvplan.lazy import lazy_import

onnx = lazy_import("onnx")
gs = lazy_import("onnx_graphsurgeon")

# onnx.TensorProto.FLOAT, FLOAT16 and BFLOAT16 (the ONNX standard's numbers; named so without importing onnx).
FLOAT_TYPES = (1, 10, 16)


class Rejected(Exception):
    """Raised inside a matcher when a candidate fails a check; becomes a near miss."""

    def __init__(self, reason: str, nodes: Iterable[gs.Node]):
        super().__init__(reason)
        self.reason = reason
        self.nodes = [n.name for n in nodes]


def producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if len(t.inputs) == 1 else None


def producer_op(t: gs.Tensor, *ops: str) -> gs.Node | None:
    p = producer(t)
    return p if p is not None and p.op in ops else None


def const_value(t: gs.Tensor) -> np.ndarray | None:
    """The value of ``t`` if it is a constant: an initializer, a Constant node, or an Identity of either.

    TorchScript exports alias equal initializers through Identity nodes, so looking
    through them matters for weights and epsilons alike.
    """
    seen = 0
    while seen < 8:
        if isinstance(t, gs.Constant):
            return np.asarray(t.values)
        p = producer(t)
        if p is None:
            return None
        if p.op == "Identity":
            t = p.inputs[0]
            seen += 1
            continue
        if p.op == "Constant":
            for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
                if key in p.attrs:
                    v = p.attrs[key]
                    return np.asarray(v.values if isinstance(v, gs.Constant) else v)
        return None
    return None


def scalar(t: gs.Tensor) -> float | None:
    v = const_value(t)
    if v is None or v.size != 1:
        return None
    return float(v.reshape(-1)[0])


def ints(t: gs.Tensor | None) -> list[int] | None:
    if t is None:
        return None
    v = const_value(t)
    if v is None or v.dtype.kind not in "iu":
        return None
    return [int(x) for x in v.reshape(-1)]


def onnx_dtype(t: gs.Tensor) -> int | None:
    """The tensor's element type as a TensorProto enum (graphsurgeon mixes numpy dtypes and enums)."""
    d = t.dtype
    if d is None:
        return None
    if isinstance(d, int):
        return d
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(d))
    except (TypeError, KeyError):
        # onnx's bfloat16 / float8 dtypes are not numpy dtypes.
        return getattr(d, "onnx_type", None)


def dtype_name(code: int | None) -> str:
    return onnx.TensorProto.DataType.Name(code) if code is not None else "unknown"


def rank(t: gs.Tensor) -> int | None:
    return len(t.shape) if t.shape is not None else None


def last_dim(t: gs.Tensor) -> int | None:
    """The static size of the last axis, or None if the rank or the size is unknown."""
    if not t.shape:
        return None
    d = t.shape[-1]
    return d if isinstance(d, int) and d >= 0 else None


def same_dim(a, b) -> bool:
    """Two dims known to be equal: equal ints, or the same symbol."""
    if isinstance(a, int) and isinstance(b, int):
        return a >= 0 and a == b
    return isinstance(a, str) and isinstance(b, str) and a != "" and a == b


def int_constant(graph: gs.Graph, name: str, values: list[int]) -> gs.Constant:
    """A new int64 constant named after ``name`` (made unique in ``graph``)."""
    return gs.Constant(unique_name(graph, name), np.array(values, dtype=np.int64))


def is_last_axis(axis: int, t: gs.Tensor) -> bool:
    if axis == -1:
        return True
    r = rank(t)
    return r is not None and axis == r - 1


def internal(t: gs.Tensor, graph: gs.Graph) -> bool:
    """True if ``t`` has exactly one consumer and is not a graph output: a pattern may delete it."""
    return len(t.outputs) == 1 and t not in graph.outputs


def other_input(node: gs.Node, t: gs.Tensor) -> gs.Tensor:
    """For a binary node known to take ``t``, the other operand."""
    a, b = node.inputs
    return b if a is t else a


def unique_name(graph: gs.Graph, base: str) -> str:
    # Kept in the instance dict: graphsurgeon's Graph.__getattr__ treats unknown
    # attributes as function lookups and logs an error for each miss.
    taken = graph.__dict__.get("_kvplan_names")
    if taken is None:
        taken = {n.name for n in graph.nodes} | set(graph.tensors().keys())
        graph.__dict__["_kvplan_names"] = taken
    name, i = base, 1
    while name in taken:
        name = f"{base}_{i}"
        i += 1
    taken.add(name)
    return name


def detach(nodes: Iterable[gs.Node]) -> None:
    """Disconnect replaced nodes so that later matches do not see them as consumers."""
    for n in nodes:
        n.inputs.clear()
        n.outputs.clear()


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
    counts: dict[str, int] = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))
