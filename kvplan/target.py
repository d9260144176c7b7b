"""The build target: its stages, what is on disk for it, and how it is built and validated.

A target is one (model, profile) under an output root: ``<out>/<model>/<profile>/``.
This module owns the stages (export -> surgery -> engines), their inputs (whose digest
decides whether a stage is current) and the orchestration of a build and a validation.
It takes plain options, never an argparse namespace: ``kvplan.cli`` parses, this acts.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import onnx
import onnxscript
import torch

from kvplan import profiles as profiles_mod
from kvplan.decoder import pack_specs
from kvplan.errors import BackendError, KvplanError
from kvplan.export import export_pack, io_contract, pack_file_names
from kvplan.export.trace_cache import TraceCache, default_dir
from kvplan.fileio import remove_stale_temporaries
from kvplan.manifest import artifact, artifacts_intact, digest, hashes_remembered, load_manifest, target_lock
from kvplan.quantize import gguf_blocks
from kvplan.quantize.checkpoint import resolve
from kvplan.quantize.stage import quantize_inputs, run_quantize
from kvplan.pipeline import Pipeline, Stage, peak_rss_mib
from kvplan.sources import closure, source_digest
from kvplan.surgery import fuse_file
from kvplan.trt import build_engine
from kvplan.trt.backend import select_backend
from kvplan.validate.onnx_stack import Pack
from kvplan.validate.perplexity import evaluate
from kvplan.validate.run import ValidateOptions, validate

STAGES = ("export", "quantize", "surgery", "engines", "validate")
# Each stage's code is the import closure of its entry module (kvplan.sources).
STAGE_MODULES = {"export": "kvplan.export", "quantize": "kvplan.quantize.stage", "surgery": "kvplan.surgery",
                 "engines": "kvplan.trt",
                 "validate": "kvplan.validate.run"}
REBUILD_HINT = "python -m build.engines"


@dataclass(frozen=True)
class BuildOptions:
    """How to build a target, beyond its profile: what the command line adds."""
    backend: str = "auto"
    no_surgery: bool = False
    stop_after: str | None = None
    no_trace_cache: bool = False
    force: bool = False
    shapes: tuple[str, ...] = ()     # --shapes overrides, NAME:N=a,b,c:lastSum=a,b,c
    allow_nonfinite: bool = False    # export weights holding NaN/inf instead of refusing them


def target_dir(out: Path, model_name: str, profile_name: str) -> Path:
    return out / model_name / profile_name


def resolve_target(model: str, profile_name: str, out: Path, shapes: tuple[str, ...] = ()):
    """(model source, profile fitted to it with --shapes applied, target directory)."""
    source = resolve(model)
    profile = profiles_mod.with_shapes(profiles_mod.load(profile_name), list(shapes))
    keep = {profiles_mod.parse_shapes(s)[0]: s for s in shapes if profiles_mod.parse_batch(s) is None}
    positions = source.origin.named("max_position_embeddings") if source.origin else ""
    profile = profiles_mod.fit_to_model(profile, source.config.max_position_embeddings, keep, positions)
    # An int4 checkpoint (or a GGUF file's int4 blocks) brings its own group size.
    if getattr(source, "checkpoint", None) is None and not gguf_blocks.has_blocks(source, profile.quantize.linears):
        profile = profiles_mod.fit_group_size(profile, source.config)
    return source, profile, target_dir(out, source.name, profile.name)


def build_stages(source, profile, target: Path, options: BuildOptions, log) -> list[Stage]:
    cfg = source.config
    specs = pack_specs(cfg, profile.decoder_pack_size, profile.kv_format, profile.kv_io, profile.cache_len)
    onnx_names = pack_file_names(len(specs))
    passes = [] if options.no_surgery else list(profile.passes)

    def export_inputs(_):
        return {"model": source.fingerprint, "config": cfg.to_dict(), "dtype": profile.dtype,
                "batch": profile.batch_dim, "kv_format": profile.kv_format, "kv_io": profile.kv_io,
                "cache_len": profile.cache_len, "decoder_pack_size": profile.decoder_pack_size,
                "allow_nonfinite": options.allow_nonfinite,
                "source": source_digest("kvplan.export"),
                "torch": torch.__version__, "onnxscript": onnxscript.__version__}

    def export_build(_):
        entries = []
        cache = None if options.no_trace_cache else TraceCache(default_dir())
        for spec, name in zip(specs, onnx_names):
            log(f"[export] layers {spec.first_layer}..{spec.last_layer - 1}"
                f"{' + final norm' if spec.final_norm else ''} -> {name}")
            result = export_pack(source, spec, profile.dtype, profile.batch_dim, target / name, log=log,
                                 trace_cache=cache, allow_nonfinite=options.allow_nonfinite)
            log(f"[export] {name}: {result.weight_bytes / 2**20:.1f} MiB of weights in {result.seconds:.1f} s"
                f"{' (external data)' if result.external_data else ''}, peak RSS {peak_rss_mib():.0f} MiB")
            entries.append(artifact(target, target / name, pack=specs.index(spec),
                                    layers=[spec.first_layer, spec.last_layer], final_norm=spec.final_norm,
                                    io=io_contract(cfg, spec, profile.batch_dim, profile.dtype)))
        return {"artifacts": entries, "weight_bytes": cfg.weight_count() * _itemsize(profile.dtype),
                "trace_cache": cache.record() if cache else "off (--no-trace-cache)"}

    stages = [Stage("export", export_inputs, export_build)]
    graphs = "export"            # the stage whose graphs surgery (or the engines) read
    quantize = quantize_inputs(source, profile)
    if quantize is not None:
        int4_names = pack_file_names(len(specs), suffix=".int4.onnx")

        def quantize_stage_inputs(done):
            return {"onnx": [a["sha256"] for a in done["export"]["artifacts"]], **quantize,
                    "source": source_digest("kvplan.quantize.stage"), "torch": torch.__version__}

        def quantize_build(done):
            return run_quantize(source, profile, target, [(target / a["path"], range(*a["layers"]))
                                                          for a in done["export"]["artifacts"]],
                                int4_names, log=log)

        stages.append(Stage("quantize", quantize_stage_inputs, quantize_build))
        graphs = "quantize"
    if options.stop_after == "quantize":
        return stages
    if passes:
        fused_names = pack_file_names(len(specs), suffix=".fused.onnx")

        def surgery_inputs(done):
            return {"onnx": [a["sha256"] for a in _graph_artifacts(done[graphs])], "passes": passes,
                    "source": source_digest("kvplan.surgery"), "onnx_version": onnx.__version__}

        def surgery_build(done):
            entries, reports = [], []
            for src_entry, name in zip(_graph_artifacts(done[graphs]), fused_names):
                log(f"[surgery] {src_entry['path']} -> {name} (passes: {', '.join(passes)})")
                report = fuse_file(target / src_entry["path"], target / name, passes, log=log)
                reports.append(report)
                entries.append(artifact(target, target / name, pack=src_entry["pack"], report=report))
            return {"artifacts": entries}

        stages.append(Stage("surgery", surgery_inputs, surgery_build))
    if options.stop_after == "export":
        return stages[:1]
    if options.stop_after == "surgery":
        return stages

    backend = select_backend(options.backend)
    plan_names = pack_file_names(len(specs), suffix=".plan")
    upstream = "surgery" if passes else graphs

    def engine_inputs(done):
        return {"onnx": [a["sha256"] for a in _graph_artifacts(done[upstream])],
                "engine": {k: v for k, v in profile.to_dict().items()
                           if k in ("shapes", "optimization_level", "workspace_mib", "hardware_compatibility",
                                    "version_compatible", "compute_capabilities", "batch")},
                "backend": backend.name, "backend_version": backend.version,
                "source": source_digest("kvplan.trt")}

    def engine_build(done):
        entries = []
        for spec, src_entry, name in zip(specs, _graph_artifacts(done[upstream]), plan_names):
            log(f"[engines] {src_entry['path']} -> {name} ({backend.name} {backend.version}, "
                f"profiles: {', '.join(s.name for s in profile.shapes)})")
            record = build_engine(target / src_entry["path"], target / name, profile,
                                  io_contract(cfg, spec, profile.batch_dim, profile.dtype), backend,
                                  target / profile.timing_cache if profile.timing_cache else None, log=log)
            entries.append(artifact(target, target / name, pack=src_entry["pack"], build=record))
        return {"artifacts": entries, "backend": backend.name, "backend_version": backend.version}

    stages.append(Stage("engines", engine_inputs, engine_build))
    return stages


def _graph_artifacts(record: dict) -> list[dict]:
    """A stage's ONNX graphs, pack by pack (the quantize stage also records its weights file)."""
    return [a for a in record["artifacts"] if "pack" in a]


@dataclass(frozen=True)
class Problem:
    """Why a built target is not current. ``kind``: no-manifest, status, no-backend, not-built,
    stale or modified; ``stage`` names the stage it concerns, where there is one."""
    kind: str
    message: str
    stage: str | None = None

    def __str__(self) -> str:
        return self.message


@dataclass
class TargetState:
    """What is on disk for (model, profile) under an output root, and whether it is current."""
    source: object
    profile: object
    target: Path
    manifest: dict | None
    problems: list[Problem]

    @property
    def fresh(self) -> bool:
        return self.manifest is not None and not self.problems


def target_state(model: str, profile_name: str, out: Path, backend: str = "auto",
                 no_surgery: bool = False, shapes: tuple[str, ...] = ()) -> TargetState:
    """Check a built target against the current inputs without building anything.

    A stage whose recorded inputs differ from what they would be now (model files,
    profile, kvplan source, library versions) is reported stale, as is a missing or
    modified artifact.
    """
    source, profile, target = resolve_target(model, profile_name, out, shapes)
    manifest = load_manifest(target)
    if manifest is None:
        return TargetState(source, profile, target, None,
                           [Problem("no-manifest", f"{target}: nothing built here (no manifest.json)")])
    options = BuildOptions(backend=backend, no_surgery=no_surgery, shapes=shapes)
    recorded = manifest.get("stages", {})
    problems = []
    if manifest.get("status") != "complete":
        problems.append(Problem("status", f"{target / 'manifest.json'}: status is {manifest.get('status')!r}, "
                                          f"not 'complete'"))
    try:
        stages = build_stages(source, profile, target, options, log=lambda _: None)
    except BackendError as e:  # no backend here: check the stages that do not need one
        options = replace(options, stop_after="surgery")
        stages = build_stages(source, profile, target, options, log=lambda _: None)
        problems.append(Problem("no-backend", f"engines stage not checked: {e}", "engines"))
    done: dict[str, dict] = {}
    for stage in stages:
        rec = recorded.get(stage.name)
        if rec is None:
            problems.append(Problem("not-built", f"stage {stage.name!r} has not been built", stage.name))
            break
        if rec.get("inputs_digest") != digest(stage.inputs(done)):
            problems.append(Problem("stale", f"stage {stage.name!r} is stale: it was built from different inputs "
                            f"(model, profile, kvplan source or library versions changed); rebuild with "
                            f"{REBUILD_HINT} --profile {profile_name} --model {model} --out {out}"
                            + "".join(f" --shapes {x}" for x in shapes),
                                    stage.name))
            break
        if not artifacts_intact(target, rec.get("artifacts", [])):
            problems.append(Problem("modified", f"stage {stage.name!r}: an artifact is missing or was modified "
                                                f"after the build", stage.name))
            break
        done[stage.name] = rec
    return TargetState(source, profile, target, manifest, problems)


def dependencies(source, profile, target: Path) -> dict:
    """The files a target's build reads, for build systems that track dependencies (CMake)."""
    files = [profile.source]
    if source.path is not None and source.path.is_file():
        files.append(str(source.path.absolute()))      # a single-file model (GGUF)
    elif source.path is not None:
        # The files the model source reads: its config, the index and every shard it names
        # (wherever in the directory they are), not whatever happens to lie beside them.
        shards = [source.path / s["file"] for s in source.fingerprint.get("shards", [])]
        index = source.path / "model.safetensors.index.json"
        files += [str(p.absolute()) for p in [source.path / "config.json", *([index] if index.exists() else []),
                                              *shards]]
    files += [str(p) for p in closure(*STAGE_MODULES.values())]
    return {"target": str(target.resolve()), "manifest": str((target / "manifest.json").resolve()),
            "depends": files}


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def build(model: str, profile_name: str, out: Path, options: BuildOptions, log: Callable[[str], None]) -> Path:
    """Build (model, profile) under ``out``, every stage whose inputs changed; returns the target directory."""
    source, profile, target = resolve_target(model, profile_name, out, options.shapes)
    for note in profile.adjusted:
        log(f"kvplan: profile {profile.name}: {note}")
    log(f"kvplan: {source.name} ({source.kind}, {source.config.num_layers} layers, {profile.dtype}) "
        f"with profile {profile.name} -> {target}")
    for note in source.notes:
        log(f"kvplan: {note}")
    header = {"model": {"name": source.name, "kind": source.kind,
                        "path": str(source.path) if source.path else None,
                        "config": source.config.to_dict(), "fingerprint": source.fingerprint},
              "profile": profile.to_dict(),
              "stages_requested": options.stop_after or "engines"}
    t0 = time.perf_counter()
    with target_lock(target, log=log):
        stale = remove_stale_temporaries(target)
        if stale:
            log(f"kvplan: removed {len(stale)} temporary file(s) an interrupted earlier build left: {', '.join(stale)}")
        stages = build_stages(source, profile, target, options, log)
        Pipeline(target, header, log=log).run(stages, force=options.force)
    log(f"kvplan: finished in {time.perf_counter() - t0:.1f} s; manifest: {target / 'manifest.json'}")
    return target


def _blocking(problem: Problem) -> bool:
    """A target built without engines (--stop-after surgery) or checked on a host without a TensorRT
    backend is still validated for what it has; anything else (stale, modified) stops us."""
    return not (problem.stage == "engines" and problem.kind in ("not-built", "no-backend"))


def _validation_state(model: str, profile_name: str, out: Path, backend: str | None,
                      no_surgery: bool, shapes: tuple[str, ...]) -> tuple[TargetState, str]:
    _, _, target = resolve_target(model, profile_name, out, shapes)
    recorded = (load_manifest(target) or {}).get("stages", {})
    backend = backend or recorded.get("engines", {}).get("backend", "auto")
    no_surgery = no_surgery or ("surgery" not in recorded and "export" in recorded and "engines" in recorded)
    return target_state(model, profile_name, out, backend=backend, no_surgery=no_surgery, shapes=shapes), backend


class StaleTarget(KvplanError):
    """The target to validate is missing, stale or incomplete; validation never rebuilds."""


def validate_target(model: str, profile_name: str, out: Path, options: ValidateOptions,
                    backend: str | None = None, no_surgery: bool = False, shapes: tuple[str, ...] = (),
                    log: Callable[[str], None] = print) -> int:
    """Validate what is built for (model, profile) under ``out``; returns the validation exit code
    (0 pass, 1 mismatch, 3 inconclusive). A stale or incomplete target raises StaleTarget."""
    with hashes_remembered():
        return _validate_current(model, profile_name, out, options, backend, no_surgery, shapes, log)


def _validate_current(model, profile_name, out, options, backend, no_surgery, shapes, log) -> int:
    state, backend_name = _validation_state(model, profile_name, out, backend, no_surgery, shapes)
    hard = [p for p in state.problems if _blocking(p)]
    if state.manifest is None or hard:
        raise StaleTarget(f"target {state.target} is stale or incomplete; nothing was validated or rebuilt: "
                          + "; ".join(map(str, hard or state.problems)))
    with target_lock(state.target, log=log):
        again, _ = _validation_state(model, profile_name, out, backend_name, no_surgery, shapes)
        if [p for p in again.problems if _blocking(p)]:
            raise StaleTarget(f"target {state.target} changed while waiting for its lock (stale): "
                              + "; ".join(map(str, again.problems)))
        return validate(again.source, again.profile, again.target, again.manifest, options, backend_name, log)


GRAPH_CHOICES = ("fused", "exported")


def eval_target(model: str, profile_name: str, out: Path, text: Path, tokens: int, reference: bool = True,
                graph: str = "fused", shapes: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict:
    """Perplexity of ``tokens`` tokens of ``text`` through the built target's ONNX graphs (``graph``:
    the fused ones, where surgery ran, else what the engines were built from; or the exported, int4
    where quantized); never rebuilds: a stale or incomplete target raises StaleTarget."""
    with hashes_remembered():
        state, _ = _validation_state(model, profile_name, out, None, False, shapes)
        hard = [p for p in state.problems if _blocking(p)]
        if state.manifest is None or hard:
            raise StaleTarget(f"target {state.target} is stale or incomplete; nothing was evaluated or rebuilt: "
                              + "; ".join(map(str, hard or state.problems)))
        stages = state.manifest["stages"]
        exported = "quantize" if "quantize" in stages else "export"
        stage = "surgery" if graph == "fused" and "surgery" in stages else exported
        cfg, profile = state.source.config, state.profile
        specs = pack_specs(cfg, profile.decoder_pack_size, profile.kv_format, profile.kv_io, profile.cache_len)
        paths = [state.target / a["path"] for a in sorted(_graph_artifacts(stages[stage]), key=lambda a: a["pack"])]
        return evaluate(state.source, profile, [Pack(s, p) for s, p in zip(specs, paths)], text, tokens,
                        reference, log)
