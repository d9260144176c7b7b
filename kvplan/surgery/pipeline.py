"""surgery.run: opset raise, constant folding, the passes in registry order, cleanup, checks."""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Callable, Sequence

from kvplan.errors import SurgeryError
from kvplan.lazy import lazy_import
from kvplan.surgery.graphutil import op_counts
from kvplan.surgery.opset import TARGET, default_opset, raise_opset
from kvplan.surgery.registry import PASSES
from kvplan.surgery.report import PassReport, SurgeryReport, summary_lines

onnx = lazy_import("onnx")
gs = lazy_import("onnx_graphsurgeon")
ort = lazy_import("onnxruntime")

# protobuf refuses to serialise messages of 2 GiB or more; above this, checks go through a file.
PROTO_LIMIT = 1_800_000_000
# Folding must shrink the graph: never materialise a folded tensor larger than this.
FOLD_SIZE_THRESHOLD = 1 << 20


def resolve_passes(passes: Sequence[str]) -> list[str]:
    """The passes to run, in registry order (the order their patterns depend on)."""
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise SurgeryError(f"unknown pass {', '.join(map(repr, unknown))} (known passes: {', '.join(PASSES)})")
    wanted = set(passes)
    return [name for name in PASSES if name in wanted]  # registry order, duplicates folded


def run(model: onnx.ModelProto, passes: Sequence[str], log: Callable[[str], None] | None = print
        ) -> tuple[onnx.ModelProto, dict]:
    """Apply ``passes`` to ``model`` (not modified) and return (checked model, report dict)."""
    names = resolve_passes(passes)
    t0 = time.perf_counter()
    nodes_before, ops_before = len(model.graph.node), op_counts(model)
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
        with _quiet_ort():
            graph.fold_constants(fold_shapes=True, size_threshold=FOLD_SIZE_THRESHOLD, error_ok=True,
                                 should_exclude_node=_keeps_int4)
        graph.cleanup().toposort()
    for name in names:
        reports[name] = PASSES[name].apply(graph)
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    _copy_model_fields(work, out)
    out = _infer(out, strict=True)
    _check(out)
    _check_io(model, out)
    report = SurgeryReport(reports, nodes_before, len(out.graph.node), ops_before, op_counts(out),
                           round(time.perf_counter() - t0, 3)).to_dict()
    if log:
        for line in summary_lines(report):
            log(f"surgery: {line}")
    return out, report


def _keeps_int4(node) -> bool:
    # A DequantizeLinear of int4 weights folded into a float constant would undo the
    # quantization (small ones fall under the size threshold): never fold it.
    return node.op == "DequantizeLinear"


@contextlib.contextmanager
def _quiet_ort():
    """Folding runs ONNX Runtime on subgraphs; its optimizer warns about every partial Unsqueeze.

    ORT has no getter for the level, so it is put back to ORT's default (warning).
    """
    ort.set_default_logger_severity(3)
    try:
        yield
    finally:
        ort.set_default_logger_severity(2)


def _dims(values) -> dict[str, tuple]:
    """Name -> (elem type, dims); symbolic dims by name, unknown ones as None."""
    out = {}
    for v in values:
        t = v.type.tensor_type
        dims = tuple(d.dim_param if d.HasField("dim_param") else (d.dim_value if d.HasField("dim_value") else None)
                     for d in t.shape.dim) if t.HasField("shape") else None
        out[v.name] = (t.elem_type, dims)
    return out


def _check_io(before: onnx.ModelProto, after: onnx.ModelProto) -> None:
    """Inputs must be untouched (names, types, every dim and dim_param: N, lastSum, sumN).

    Outputs keep their types, static dims and every dim_param the inputs define;
    an exporter's private symbol on an output (TorchScript's "Mulhidden_out_dim_0")
    may be refined to the static value shape inference proves.
    """
    ins_b, ins_a = _dims(before.graph.input), _dims(after.graph.input)
    if ins_b != ins_a:
        changed = {k: (ins_b.get(k), ins_a.get(k)) for k in set(ins_b) | set(ins_a) if ins_b.get(k) != ins_a.get(k)}
        raise SurgeryError(f"graph inputs changed (before, after): {changed}")
    named = {d for _, dims in ins_b.values() for d in (dims or ()) if isinstance(d, str)}
    outs_b, outs_a = _dims(before.graph.output), _dims(after.graph.output)
    if list(outs_b) != list(outs_a):
        raise SurgeryError(f"graph outputs changed: {list(outs_b)} -> {list(outs_a)}")
    for name, (tb, db) in outs_b.items():
        ta, da = outs_a[name]
        ok = tb == ta and (db is None or (da is not None and len(da) == len(db) and all(
            b is None or (isinstance(b, str) and b not in named) or a == b for b, a in zip(db, da))))
        if not ok:
            raise SurgeryError(f"graph output {name} changed: {(tb, db)} -> {(ta, da)}")


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
