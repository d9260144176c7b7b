"""Keep the big matrices out of surgery's protobuf round trips.

Shape inference, graphsurgeon's export and the full checker each copy the whole
model, weights included: 7-8x the weight bytes at peak. The passes never look at
the weights a MatMul multiplies by, so while surgery runs those initializers are
set aside and stand in the graph as inputs of the same name, type and shape; the
bytes are put back as initializers afterwards. Only initializers read by nothing
but MatMul/Gemm are set aside: anything a pass or constant folding may inspect
(norm gains, biases, scalars, Identity-aliased weights) stays in place.
"""
from __future__ import annotations

from kvplan.lazy import lazy_import

onnx = lazy_import("onnx")

SET_ASIDE_OPS = {"MatMul", "Gemm"}
MIN_BYTES = 1 << 16


def matmul_only(model: onnx.ModelProto) -> set[str]:
    """Names read by MatMul/Gemm nodes alone (and not graph outputs): what may be set aside."""
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    outputs = {o.name for o in model.graph.output}
    return {name for name, ops in readers.items() if ops <= SET_ASIDE_OPS and name not in outputs}


def set_aside(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Move big MatMul-only initializers out of ``model`` (in place); returns them by name."""
    movable = matmul_only(model)
    kept, aside = [], {}
    for t in model.graph.initializer:
        if t.HasField("raw_data") and len(t.raw_data) >= MIN_BYTES and t.name in movable:
            aside[t.name] = t
        else:
            kept.append(t)
    if not aside:
        return {}
    moved = [onnx.TensorProto() for _ in aside]
    for dst, src in zip(moved, aside.values()):
        dst.CopyFrom(src)       # the copy is made before the original is released below
    aside = dict(zip(aside, moved))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name, t in aside.items():
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
    return aside


def put_back(model: onnx.ModelProto, aside: dict[str, onnx.TensorProto]) -> None:
    """Turn the stand-in inputs back into the initializers they were (in place)."""
    if not aside:
        return
    stand_ins = [v for v in model.graph.input if v.name in aside]
    for v in stand_ins:
        model.graph.input.remove(v)
    missing = set(aside) - {v.name for v in stand_ins}
    if missing:
        raise RuntimeError(f"surgery dropped weight input(s) {sorted(missing)[:3]}: cannot restore them")
    for name in list(aside):
        model.graph.initializer.append(aside.pop(name))


def take_back(model: onnx.ModelProto, aside: dict[str, onnx.TensorProto]):
    """Drop the stand-in inputs from ``model`` (in place) and return a callable yielding the weights
    they stood for, for ``write_streamed`` to append as initializers. Each stand-in must still
    have its weight's type and shape: the passes may rewire a weight, never change it."""
    if not aside:
        return lambda: iter(())
    stand_ins = {v.name: v for v in model.graph.input if v.name in aside}
    missing = set(aside) - set(stand_ins)
    if missing:
        raise RuntimeError(f"surgery dropped weight input(s) {sorted(missing)[:3]}: cannot restore them")
    for name, v in stand_ins.items():
        t, tt = aside[name], v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim]
        if tt.elem_type != t.data_type or dims != list(t.dims):
            raise RuntimeError(f"weight input {name!r} changed during surgery: "
                               f"{tt.elem_type} {dims} vs its tensor's {t.data_type} {list(t.dims)}")
    kept = [v for v in model.graph.input if v.name not in aside]
    del model.graph.input[:]
    model.graph.input.extend(kept)
    return lambda: iter(aside.values())
