"""surgery.run: opset raise, constant folding, the passes in registry order, cleanup, checks."""
from __future__ import annotations

import os
import tempfile
import time
from typing import Callable, Sequence

import onnx
import onnx_graphsurgeon as gs

from .graphutil import op_counts
from .opset import TARGET, default_opset, raise_opset
from .registry import PASSES
from .report import PassReport, SurgeryReport, summary_lines

# protobuf refuses to serialise messages of 2 GiB or more; above this, checks go through a file.
PROTO_LIMIT = 1_800_000_000
# Folding must shrink the graph: never materialise a folded tensor larger than this.
FOLD_SIZE_THRESHOLD = 1 << 20


class SurgeryError(RuntimeError):
    """The graph failed a check after surgery; nothing is emitted."""


def resolve_passes(passes: Sequence[str]) -> list[str]:
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"unknown pass {', '.join(map(repr, unknown))} (known passes: {', '.join(PASSES)})")
    wanted = set(passes)
    return [name for name in PASSES if name in wanted]  # registry order, duplicates folded


def run(model: onnx.ModelProto, passes: Sequence[str], log: Callable[[str], None] | None = print
        ) -> tuple[onnx.ModelProto, dict]:
    """Apply ``passes`` to ``model`` (not modified) and return (checked model, report dict)."""
    names = resolve_passes(passes)
    t0 = time.perf_counter()
    nodes_before, ops_before = len(model.graph.node), op_counts(model)
    io_before = _io_dims(model)
    reports: dict[str, PassReport] = {}
    work = model
    if names:
        work, was = raise_opset(model)
        if was < TARGET and log:
            log(f"surgery: raised opset {was} -> {default_opset(work)}")
    graph = gs.import_onnx(_infer(work))
    if names:
        # Fold first: TorchScript graphs compute slice bounds from Shape/Gather chains and
        # alias weights through Identity; folded, the patterns read plain constants.
        graph.fold_constants(fold_shapes=True, size_threshold=FOLD_SIZE_THRESHOLD, error_ok=True)
        graph.cleanup().toposort()
    for name in names:
        reports[name] = PASSES[name].apply(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    _copy_model_fields(work, out)
    out = _infer(out, strict=True)
    _check(out)
    io_after = _io_dims(out)
    if io_after != io_before:
        changed = {k: (io_before.get(k), io_after.get(k)) for k in set(io_before) | set(io_after)
                   if io_before.get(k) != io_after.get(k)}
        raise SurgeryError(f"graph inputs/outputs changed shape (before, after): {changed}")
    report = SurgeryReport(reports, nodes_before, len(out.graph.node), ops_before, op_counts(out),
                           round(time.perf_counter() - t0, 3)).to_dict()
    if log:
        for line in summary_lines(report):
            log(f"surgery: {line}")
    return out, report


def _io_dims(model: onnx.ModelProto) -> dict[str, tuple]:
    """Name -> (elem type, dims) of every graph input and output; symbolic dims by name."""
    out = {}
    for v in list(model.graph.input) + list(model.graph.output):
        t = v.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                     for d in t.shape.dim) if t.HasField("shape") else None
        out[v.name] = (t.elem_type, dims)
    return out


def _copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto) -> None:
    dst.ir_version = max(src.ir_version, dst.ir_version)
    dst.producer_name, dst.producer_version = src.producer_name, src.producer_version
    dst.domain, dst.model_version, dst.doc_string = src.domain, src.model_version, src.doc_string
    del dst.metadata_props[:]
    dst.metadata_props.extend(src.metadata_props)
    # graphsurgeon exports the opsets it imported; keep every domain's version from the source.
    del dst.opset_import[:]
    dst.opset_import.extend(src.opset_import)


def _big(model: onnx.ModelProto) -> bool:
    return sum(len(t.raw_data) for t in model.graph.initializer) > PROTO_LIMIT


def _infer(model: onnx.ModelProto, strict: bool = False) -> onnx.ModelProto:
    if not _big(model):
        return onnx.shape_inference.infer_shapes(model, check_type=strict, strict_mode=strict, data_prop=True)
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, "in.onnx"), os.path.join(d, "out.onnx")
        onnx.save(model, src, save_as_external_data=True, location="in.onnx.data")
        onnx.shape_inference.infer_shapes_path(src, dst, check_type=strict, strict_mode=strict, data_prop=True)
        return onnx.load(dst)


def _check(model: onnx.ModelProto) -> None:
    try:
        if not _big(model):
            onnx.checker.check_model(model, full_check=True)
            return
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "model.onnx")
            onnx.save(model, path, save_as_external_data=True, location="model.onnx.data")
            onnx.checker.check_model(path, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise SurgeryError(f"the graph after surgery fails onnx.checker: {e}") from e
