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

from kvplan import profiles as profiles_mod
from kvplan.embed_head.stage import EmbedHeadStage, has_graphs
from kvplan.errors import BackendError, KvplanError
from kvplan.export.stage import ExportStage
from kvplan.fileio import remove_stale_temporaries
from kvplan.lazy import lazy_import
from kvplan.manifest import artifacts_intact, digest, hashes_remembered, load_manifest, target_lock
from kvplan.models import resolve
from kvplan.pipeline import Pipeline, graph_artifacts
from kvplan.quantize.stage import QuantizeStage, brings_own_int4
from kvplan.sources import closure
from kvplan.stack import export_specs
from kvplan.surgery.stage import SurgeryStage
from kvplan.trt.backend import select_backend
from kvplan.trt.stage import EngineStage

# The later stages' and the runtime's modules, imported when validation, eval or generate runs: a
# build (a rebuild with nothing to do above all) never loads them.
generate = lazy_import("kvplan.generate")
onnx_stack = lazy_import("kvplan.validate.onnx_stack")
perplexity = lazy_import("kvplan.validate.perplexity")
validate_run = lazy_import("kvplan.validate.run")

STAGES = ("export", "quantize", "surgery", "embed_head", "engines", "validate")
# Each stage's code is the import closure of its module (kvplan.sources).
STAGE_MODULES = {"export": "kvplan.export.stage", "quantize": "kvplan.quantize.stage",
                 "surgery": "kvplan.surgery.stage",
                 "embed_head": "kvplan.embed_head.stage", "engines": "kvplan.trt.stage", "validate": "kvplan.validate.run"}
REBUILD_HINT = "python -m build.engines"


@dataclass(frozen=True)
class BuildOptions:
    """How to build a target, beyond its profile: what the command line adds."""
    backend: str = "auto"
    no_surgery: bool = False
    stop_after: str | None = None
    force: bool = False
    shapes: tuple[str, ...] = ()     # --shapes overrides, NAME:N=a,b,c:lastSum=a,b,c
    allow_nonfinite: bool = False    # export weights holding NaN/inf instead of refusing them
    # Build the stages before the engines, and the engines, each in a forked process of their own
    # (kvplan.pipeline). The command line turns it on; Python callers ask for it, and where torch
    # or another thread-pool library is already loaded it is skipped (kvplan.forked.can_fork).
    fork: bool = False


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
    if not brings_own_int4(source, profile.quantize.linears):
        profile = profiles_mod.fit_group_size(profile, source.config)
    return source, profile, target_dir(out, source.name, profile.name)


def build_stages(source, profile, target: Path, options: BuildOptions, log) -> list:
    """The target's stages in build order, each its own module's class (kvplan.pipeline runs them)."""
    stages: list = [ExportStage(source, profile, target, allow_nonfinite=options.allow_nonfinite,
                                log=log)]
    quantize = QuantizeStage.of(source, profile, target, log)
    if quantize is not None:
        stages.append(quantize)
    if options.stop_after == "export":
        return stages[:1]           # the quantize settings were still checked, as for a full build
    if options.stop_after == "quantize":
        return stages
    passes = () if options.no_surgery else tuple(profile.surgery.passes)
    if passes:
        stages.append(SurgeryStage(target, passes, upstream=stages[-1].name, log=log))
    if options.stop_after == "surgery":
        return stages
    graphs = stages[-1].name
    ends = EmbedHeadStage(source, profile, target, log=log) if has_graphs(source) else None
    if ends is not None:
        stages.append(ends)
    if options.stop_after == "embed_head":
        return stages
    stages.append(EngineStage(source, profile, target, select_backend(options.backend), upstream=graphs,
                              ends=ends.name if ends else None, log=log))
    return stages


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
                 no_surgery: bool = False, shapes: tuple[str, ...] = (), resolved: tuple | None = None
                 ) -> TargetState:
    """Check a built target against the current inputs without building anything.

    A stage whose recorded inputs differ from what they would be now (model files,
    profile, kvplan source, library versions) is reported stale, as is a missing or
    modified artifact. ``resolved``: resolve_target()'s answer where the caller has it.
    """
    source, profile, target = resolved or resolve_target(model, profile_name, out, shapes)
    manifest = load_manifest(target)
    if manifest is None:
        return TargetState(source, profile, target, None,
                           [Problem("no-manifest", f"{target}: nothing built here (no manifest.json)")])
    recorded = manifest.get("stages", {})
    # --allow-nonfinite-weights is a choice the build made, recorded in the export's inputs: the
    # target is checked as it was built, so that validation (which has no such flag) can run
    # and fail on the outputs of those weights instead of calling the export stale.
    options = BuildOptions(backend=backend, no_surgery=no_surgery, shapes=shapes,
                           allow_nonfinite=built_with_nonfinite(manifest))
    problems = []
    if manifest.get("status") != "complete":
        problems.append(Problem("status", f"{target / 'manifest.json'}: status is {manifest.get('status')!r}, "
                                          f"not 'complete'"))
    try:
        stages = build_stages(source, profile, target, options, log=lambda _: None)
    except BackendError as e:  # no backend here: check the stages that do not need one
        options = replace(options, stop_after="embed_head")
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
                            + "".join(f" --shapes {x}" for x in shapes)
                            + (" --allow-nonfinite-weights" if options.allow_nonfinite else ""),
                                    stage.name))
            break
        if not artifacts_intact(target, rec.get("artifacts", [])):
            problems.append(Problem("modified", f"stage {stage.name!r}: an artifact is missing or was modified "
                                                f"after the build", stage.name))
            break
        done[stage.name] = rec
    return TargetState(source, profile, target, manifest, problems)


def built_with_nonfinite(manifest: dict | None) -> bool:
    """Whether the target's export was built with --allow-nonfinite-weights (its manifest says)."""
    inputs = ((manifest or {}).get("stages", {}).get("export") or {}).get("inputs") or {}
    return bool(inputs.get("allow_nonfinite", False))


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
        Pipeline(target, header, log=log, fork=options.fork).run(stages, force=options.force)
    log(f"kvplan: finished in {time.perf_counter() - t0:.1f} s; manifest: {target / 'manifest.json'}")
    return target


def _blocking(problem: Problem) -> bool:
    """A target built without engines or the embedding and head graphs (--stop-after surgery) or
    checked on a host without a TensorRT backend is still validated for what it has; anything else
    (stale, modified) stops us."""
    return not ((problem.stage == "engines" and problem.kind in ("not-built", "no-backend"))
                or (problem.stage == "embed_head" and problem.kind == "not-built"))


def _validation_state(model: str, profile_name: str, out: Path, backend: str | None, no_surgery: bool,
                      shapes: tuple[str, ...], resolved: tuple) -> tuple[TargetState, str]:
    """The target's state as validation and eval check it: with the backend and passes it was built with."""
    recorded = (load_manifest(resolved[2]) or {}).get("stages", {})
    backend = backend or recorded.get("engines", {}).get("backend", "auto")
    no_surgery = no_surgery or ("surgery" not in recorded and "export" in recorded and "engines" in recorded)
    return target_state(model, profile_name, out, backend=backend, no_surgery=no_surgery, shapes=shapes,
                        resolved=resolved), backend


class StaleTarget(KvplanError):
    """The target to validate is missing, stale or incomplete; validation never rebuilds."""


def validate_target(model: str, profile_name: str, out: Path, options: "validate_run.ValidateOptions",
                    backend: str | None = None, no_surgery: bool = False, shapes: tuple[str, ...] = (),
                    log: Callable[[str], None] = print) -> int:
    """Validate what is built for (model, profile) under ``out``; returns the validation exit code
    (0 pass, 1 mismatch, 3 inconclusive). A stale or incomplete target raises StaleTarget."""
    with hashes_remembered():
        return _validate_current(model, profile_name, out, options, backend, no_surgery, shapes, log)


def _validate_current(model, profile_name, out, options, backend, no_surgery, shapes, log) -> int:
    # Resolved once: the model's files are read and fingerprinted once, the state checked twice.
    resolved = resolve_target(model, profile_name, out, shapes)
    state, backend_name = _validation_state(model, profile_name, out, backend, no_surgery, shapes, resolved)
    hard = [p for p in state.problems if _blocking(p)]
    if state.manifest is None or hard:
        raise StaleTarget(f"target {state.target} is stale or incomplete; nothing was validated or rebuilt: "
                          + "; ".join(map(str, hard or state.problems)))
    with target_lock(state.target, log=log):
        again, _ = _validation_state(model, profile_name, out, backend_name, no_surgery, shapes, resolved)
        if [p for p in again.problems if _blocking(p)]:
            raise StaleTarget(f"target {state.target} changed while waiting for its lock (stale): "
                              + "; ".join(map(str, again.problems)))
        if built_with_nonfinite(again.manifest):
            log(f"kvplan: {again.target} was built with --allow-nonfinite-weights: outputs holding NaN or "
                f"infinite values fail validation")
        return validate_run.validate(again.source, again.profile, again.target, again.manifest, options, backend_name, log)


GRAPH_CHOICES = ("fused", "exported")


def _current(model: str, profile_name: str, out: Path, shapes: tuple[str, ...], what: str) -> TargetState:
    """The built target, checked current as validation checks it; StaleTarget otherwise (nothing is rebuilt)."""
    state, _ = _validation_state(model, profile_name, out, None, False, shapes,
                                 resolve_target(model, profile_name, out, shapes))
    hard = [p for p in state.problems if _blocking(p)]
    if state.manifest is None or hard:
        raise StaleTarget(f"target {state.target} is stale or incomplete; nothing was {what} or rebuilt: "
                          + "; ".join(map(str, hard or state.problems)))
    return state


def decoder_packs(state: TargetState, graph: str = "fused") -> list:
    """The decoder's graphs, pack by pack: the fused ones where surgery ran (``graph`` "fused"), else
    what the engines were built from; "exported": the export's (int4 where quantized)."""
    stages = state.manifest["stages"]
    exported = "quantize" if "quantize" in stages else "export"
    stage = "surgery" if graph == "fused" and "surgery" in stages else exported
    specs = export_specs(state.source.config, state.profile.export)
    paths = [state.target / a["path"] for a in sorted(graph_artifacts(stages[stage]), key=lambda a: a["pack"])]
    return [onnx_stack.Pack(s, p) for s, p in zip(specs, paths)]


def eval_target(model: str, profile_name: str, out: Path, text: Path, tokens: int, reference: bool = True,
                graph: str = "fused", shapes: tuple[str, ...] = (), log: Callable[[str], None] = print) -> dict:
    """Perplexity of ``tokens`` tokens of ``text`` through the built target's ONNX graphs (``graph``:
    see decoder_packs); never rebuilds: a stale or incomplete target raises StaleTarget."""
    with hashes_remembered():
        state = _current(model, profile_name, out, shapes, "evaluated")
        ends = perplexity.full_logit_head(state.manifest["stages"].get("embed_head"))
        return perplexity.evaluate(state.source, state.profile, decoder_packs(state, graph), text, tokens, reference, log,
                        ends=tuple(state.target / p for p in ends) if ends else None)


def generate_target(model: str, profile_name: str, out: Path, options: "generate.GenerateOptions",
                    write: Callable[[str], None], log: Callable[[str], None]) -> "generate.Generated":
    """Text from the built target (kvplan.generate), streamed to ``write``; never rebuilds."""
    with hashes_remembered():
        state = _current(model, profile_name, out, options.shapes, "generated")
    return generate.from_target(state.source, state.profile, state.target, state.manifest,
                                decoder_packs(state, options.graph), options, write, log)
