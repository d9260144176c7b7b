"""Raise the default-domain opset to the one the fused ops need, without changing other ops' meaning."""
from __future__ import annotations

import onnx.version_converter

from kvplan.errors import OpsetError
from kvplan.lazy import lazy_import
from kvplan.surgery.graphutil import op_counts

onnx = lazy_import("onnx")

TARGET = 23


def default_opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def raise_opset(model: onnx.ModelProto, target: int = TARGET) -> tuple[onnx.ModelProto, int]:
    """Return (model at >= target, the original opset). A model already there is returned as is.

    The version converter rewrites ops whose signature changed between opsets
    (ReduceMean's axes attribute → input at 18, ...); it may add Constant nodes
    for those inputs but must not add, drop or swap any other op. That is checked,
    and the result must pass the full checker, or the conversion is refused.
    """
    before = default_opset(model)
    if before >= target:
        return model, before
    try:
        out = onnx.version_converter.convert_version(model, target)
    except Exception as e:  # the converter raises bare RuntimeErrors from C++
        raise OpsetError(f"cannot convert opset {before} to {target}: {e}") from e
    old, new = op_counts(model), op_counts(out)
    old.pop("Constant", None)
    new.pop("Constant", None)
    if old != new:
        diff = {k: (old.get(k, 0), new.get(k, 0)) for k in set(old) | set(new) if old.get(k) != new.get(k)}
        raise OpsetError(f"converting opset {before} to {target} changed the ops (before, after): {diff}")
    need = onnx.helper.find_min_ir_version_for([onnx.helper.make_opsetid("", target)])
    if out.ir_version < need:
        out.ir_version = need
    return out, before
