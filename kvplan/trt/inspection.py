"""Inspect a ``.plan`` (or an ``.onnx``): the network's layer summary and, where the engine can be
deserialized here, the engine inspector's JSON."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvplan.manifest import load_manifest
from kvplan.trt.backend import Backend
from kvplan.trt.callbacks import Log, Pending, make_logger
from kvplan.trt.errors import BuildError
from kvplan.trt.network import layer_table, network_summary, parse
from kvplan.trt.plan_io import deserialize, host_code_allowed


def _build_record(plan: Path) -> dict:
    """The target manifest's build record of ``plan`` ({} where there is none)."""
    manifest = load_manifest(plan.parent) or {}
    for entry in manifest.get("stages", {}).get("engines", {}).get("artifacts", []):
        if entry.get("path") == plan.name:
            return entry.get("build") or {}
    return {}


def _onnx_for_plan(plan: Path) -> Path | None:
    """The graph a plan was built from: as the target's manifest records it, else by file name
    (the fused graph of the same pack before the exported one)."""
    source = _build_record(plan).get("onnx")
    if source:
        p = Path(source)
        p = p if p.is_absolute() else plan.parent / p
        if p.is_file():
            return p
    stem = plan.name[:-len(".plan")] if plan.name.endswith(".plan") else plan.stem
    for cand in (plan.parent / f"{stem}.fused.onnx", plan.parent / f"{stem}.onnx"):
        if cand.is_file():
            return cand
    return None


def inspect(path: Path, backend: Backend, log: Log = print, *, onnx: Path | None = None) -> dict:
    """Layer summary of the network a ``.plan`` was built from (or of an ``.onnx``), and, where the
    engine can be deserialized here, the engine inspector's JSON."""
    trt = backend.module
    path = Path(path)
    if not path.is_file():
        raise BuildError(f"{path}: no such file")
    result: dict[str, Any] = {"path": str(path), "backend": backend.name, "backend_version": backend.version}
    is_plan = path.suffix != ".onnx"
    onnx_path = Path(onnx) if onnx is not None else (_onnx_for_plan(path) if is_plan else path)
    result["onnx"] = str(onnx_path) if onnx_path else None

    pending = Pending()
    logger = make_logger(trt, lambda msg: None, pending)
    if onnx_path is None:
        log(f"{path}: no source ONNX found next to it ({path.stem}.onnx, decoder.fused.onnx, decoder.onnx); "
            f"no network layer summary")
        result["network"] = None
    else:
        _, network, _parser, _weights = parse(trt, backend, onnx_path, logger)
        rows = layer_table(network)
        summary = network_summary(network)
        result["network"] = {**summary, "layer_table": rows}
        log(f"network of {onnx_path} ({backend.name} {backend.version}): {summary['layers']} layers")
        for name, io in summary["inputs"].items():
            log(f"  input  {name}: {io['dtype']} {io['shape']}")
        for name, io in summary["outputs"].items():
            log(f"  output {name}: {io['dtype']} {io['shape']}")
        log("  layer types: " + ", ".join(f"{t} {n}" for t, n in summary["layer_types"].items()))
        for r in rows:
            outs = "; ".join(f"{o['name']} {o['dtype']}{o['shape']}" for o in r["outputs"])
            log(f"  [{r['index']:4d}] {r['type']:<18s} {r['name']} -> {outs}")

    if not is_plan:
        result["engine"] = None
        result["engine_why"] = "an ONNX file has no engine; build one to inspect its layers"
    elif not backend.can_run:
        why = (f"engine information needs the plan deserialized, which {backend.name} cannot do here: "
               f"{backend.why_not_run}")
        log(f"{path}: {why}")
        result["engine"] = None
        result["engine_why"] = why
    else:
        _runtime, engine = deserialize(trt, logger, path.read_bytes(), f"{path}: could not deserialize the plan: ",
                                       host_code_allowed(_build_record(path).get("options")))
        inspector = engine.create_engine_inspector()
        info = inspector.get_engine_information(trt.LayerInformationFormat.JSON)
        try:
            result["engine"] = json.loads(info)
        except ValueError:
            result["engine"] = info
        result["engine_why"] = None
        log(f"engine information of {path}:")
        log(info if isinstance(info, str) else json.dumps(info, indent=1))
    return result
