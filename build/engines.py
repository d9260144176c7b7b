"""kvplan's pipeline CLI: export -> surgery -> engines (-> validation).

    python -m build.engines --profile fp16 [--model PRESET_OR_DIR] [--out engines]

Artifacts land in <out>/<model>/<profile>/ with a manifest.json listing each one
(relative path, sha256) and the inputs that produced it. A second run with the
same inputs rebuilds nothing.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from . import profiles as profiles_mod
from .config import ConfigError
from .decoder import pack_specs
from .export import ExportError, export_pack, io_contract, pack_file_names
from .trace_cache import TraceCache, default_dir
from .manifest import artifact, source_digest
from .models import DEFAULT_MODEL, ModelError, resolve
from .pipeline import Pipeline, Stage, peak_rss_mib

STAGES = ("export", "surgery", "engines", "validate")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m build.engines",
        description="Export a Llama-family decoder stack to ONNX with a flattened KV cache, fuse it, "
                    "and build TensorRT engines with dynamic-shape profiles for N and lastSum.")
    p.add_argument("--profile", default=profiles_mod.DEFAULT_PROFILE,
                   help="build profile: a name from profiles/ (fp16, bf16, fp32, ...) or a path to a .toml "
                        "(default: %(default)s)")
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="a preset name (seeded random weights) or a local checkpoint directory: Hugging Face "
                        "Llama/Mistral/Qwen2/Qwen3, or MiniCPM-o-2_6 (its TTS decoder) (default: %(default)s)")
    p.add_argument("--out", default="engines", type=Path,
                   help="output root; artifacts go to OUT/<model>/<profile>/ (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=("auto", "tensorrt", "tensorrt-rtx"),
                   help="TensorRT flavour for the engines stage: auto takes tensorrt when importable, "
                        "else tensorrt_rtx (default: %(default)s)")
    p.add_argument("--no-surgery", action="store_true",
                   help="build the engine from the exported graph as is (same as an empty [surgery] passes list)")
    p.add_argument("--stop-after", choices=STAGES[:3], default=None,
                   help="stop after this stage (default: run every stage)")
    p.add_argument("--validate", action="store_true",
                   help="after building, check every stage's numbers (same as python -m build.validate)")
    p.add_argument("--force", action="store_true", help="rebuild every stage even when its inputs are unchanged")
    p.add_argument("--no-trace-cache", action="store_true",
                   help="trace the decoder pieces afresh and do not store them (default: reuse traces kept under "
                        "$KVPLAN_CACHE_DIR, else $XDG_CACHE_HOME/kvplan, else ~/.cache/kvplan)")
    p.add_argument("--inspect", metavar="PLAN_OR_TARGET", type=Path,
                   help="print the layer summary of a built .plan (or of the plan(s) in a target directory) and exit")
    p.add_argument("--list-presets", action="store_true", help="list the model presets and exit")
    p.add_argument("--print-deps", action="store_true",
                   help="print, as JSON, the target directory, its manifest and the files the build depends on "
                        "(profile, model files, kvplan sources) and exit; used by CMakeLists.txt")
    return p.parse_args(argv)


class UserError(Exception):
    """A problem with the user's input: printed without a traceback, exit code 2."""


def target_dir(out: Path, model_name: str, profile_name: str) -> Path:
    return out / model_name / profile_name


def build_stages(source, profile, target: Path, args, log) -> list[Stage]:
    cfg = source.config
    specs = pack_specs(cfg, profile.decoder_pack_size, profile.kv_format, profile.kv_io, profile.cache_len)
    onnx_names = pack_file_names(len(specs))
    passes = [] if args.no_surgery else list(profile.passes)

    def export_inputs(_):
        import onnxscript
        import torch
        return {"model": source.fingerprint, "config": cfg.to_dict(), "dtype": profile.dtype,
                "batch": profile.batch, "kv_format": profile.kv_format, "kv_io": profile.kv_io,
                "cache_len": profile.cache_len, "decoder_pack_size": profile.decoder_pack_size,
                "source": source_digest("build/config.py", "build/decoder.py", "build/export.py", "build/stitch.py",
                                        "build/kv_write.py", "build/models"),
                "torch": torch.__version__, "onnxscript": onnxscript.__version__}

    def export_build(_):
        entries = []
        cache = None if args.no_trace_cache else TraceCache(default_dir())
        for spec, name in zip(specs, onnx_names):
            log(f"[export] layers {spec.first_layer}..{spec.last_layer - 1}"
                f"{' + final norm' if spec.final_norm else ''} -> {name}")
            result = export_pack(source, spec, profile.dtype, profile.batch, target / name, log=log,
                                 trace_cache=cache)
            log(f"[export] {name}: {result.weight_bytes / 2**20:.1f} MiB of weights in {result.seconds:.1f} s"
                f"{' (external data)' if result.external_data else ''}, peak RSS {peak_rss_mib():.0f} MiB")
            entries.append(artifact(target, target / name, pack=specs.index(spec),
                                    layers=[spec.first_layer, spec.last_layer], final_norm=spec.final_norm,
                                    io=io_contract(cfg, spec, profile.batch, profile.dtype)))
        return {"artifacts": entries, "weight_bytes": cfg.weight_count() * _itemsize(profile.dtype),
                "trace_cache": cache.record() if cache else "off (--no-trace-cache)"}

    stages = [Stage("export", export_inputs, export_build)]
    if passes:
        fused_names = pack_file_names(len(specs), suffix=".fused.onnx")

        def surgery_inputs(done):
            import onnx
            return {"onnx": [a["sha256"] for a in done["export"]["artifacts"]], "passes": passes,
                    "source": source_digest("surgery"), "onnx_version": onnx.__version__}

        def surgery_build(done):
            import surgery
            entries, reports = [], []
            for src_entry, name in zip(done["export"]["artifacts"], fused_names):
                log(f"[surgery] {src_entry['path']} -> {name} (passes: {', '.join(passes)})")
                report = surgery.fuse_file(target / src_entry["path"], target / name, passes, log=log)
                reports.append(report)
                entries.append(artifact(target, target / name, pack=src_entry["pack"], report=report))
            return {"artifacts": entries}

        stages.append(Stage("surgery", surgery_inputs, surgery_build))
    if args.stop_after == "export":
        return stages[:1]
    if args.stop_after == "surgery":
        return stages

    from .backend import select_backend
    backend = select_backend(args.backend)
    plan_names = pack_file_names(len(specs), suffix=".plan")
    upstream = "surgery" if passes else "export"

    def engine_inputs(done):
        return {"onnx": [a["sha256"] for a in done[upstream]["artifacts"]],
                "engine": {k: v for k, v in profile.to_dict().items()
                           if k in ("shapes", "optimization_level", "workspace_mib", "hardware_compatibility",
                                    "version_compatible", "compute_capabilities", "batch")},
                "backend": backend.name, "backend_version": backend.version,
                "source": source_digest("build/trt", "build/backend.py")}

    def engine_build(done):
        from .trt import build_engine
        entries = []
        for spec, src_entry, name in zip(specs, done[upstream]["artifacts"], plan_names):
            log(f"[engines] {src_entry['path']} -> {name} ({backend.name} {backend.version}, "
                f"profiles: {', '.join(s.name for s in profile.shapes)})")
            record = build_engine(target / src_entry["path"], target / name, profile,
                                  io_contract(cfg, spec, profile.batch, profile.dtype), backend,
                                  target / profile.timing_cache if profile.timing_cache else None, log=log)
            entries.append(artifact(target, target / name, pack=src_entry["pack"], build=record))
        return {"artifacts": entries, "backend": backend.name, "backend_version": backend.version}

    stages.append(Stage("engines", engine_inputs, engine_build))
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
                 no_surgery: bool = False) -> TargetState:
    """Check a built target against the current inputs without building anything.

    A stage whose recorded inputs differ from what they would be now (model files,
    profile, kvplan source, library versions) is reported stale, as is a missing or
    modified artifact.
    """
    from .manifest import artifacts_intact, digest, load_manifest
    profile = profiles_mod.load(profile_name)
    source = resolve(model)
    target = target_dir(out, source.name, profile.name)
    manifest = load_manifest(target)
    if manifest is None:
        return TargetState(source, profile, target, None,
                           [Problem("no-manifest", f"{target}: nothing built here (no manifest.json)")])
    args = argparse.Namespace(no_surgery=no_surgery, stop_after=None, backend=backend, no_trace_cache=False)
    recorded = manifest.get("stages", {})
    problems = []
    if manifest.get("status") != "complete":
        problems.append(Problem("status", f"{target / 'manifest.json'}: status is {manifest.get('status')!r}, "
                                          f"not 'complete'"))
    try:
        stages = build_stages(source, profile, target, args, log=lambda _: None)
    except Exception as e:  # no backend here: check the stages that do not need one
        args.stop_after = "surgery"
        stages = build_stages(source, profile, target, args, log=lambda _: None)
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
                            f"python -m build.engines --profile {profile_name} --model {model} --out {out}",
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
    from .manifest import PACKAGE_ROOT
    files = [profile.source]
    if source.path is not None:
        files += [str(p.resolve()) for p in sorted(source.path.iterdir())
                  if p.name == "config.json" or p.suffix == ".safetensors" or p.name.endswith(".index.json")]
    for pkg in ("build", "surgery"):
        files += [str(p) for p in sorted((PACKAGE_ROOT / pkg).rglob("*.py"))]
    return {"target": str(target.resolve()), "manifest": str((target / "manifest.json").resolve()),
            "depends": files}


def _itemsize(dtype: str) -> int:
    return 4 if dtype == "float32" else 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        if args.list_presets:
            from .models.presets import PRESETS
            for name, cfg in PRESETS.items():
                print(f"{name:20s} {cfg.family:8s} layers={cfg.num_layers} hidden={cfg.hidden_size} "
                      f"heads={cfg.num_heads}/{cfg.num_kv_heads} head_dim={cfg.head_dim}")
            return 0
        if args.inspect is not None:
            from .backend import select_backend
            from .trt import inspect
            plans = sorted(args.inspect.glob("*.plan")) if args.inspect.is_dir() else [args.inspect]
            if not plans or not all(p.exists() for p in plans):
                raise UserError(f"{args.inspect}: no .plan found")
            backend = select_backend(args.backend)
            for plan in plans:
                inspect(plan, backend, log=log)
            return 0
        profile = profiles_mod.load(args.profile)
        source = resolve(args.model)
        profiles_mod.check_against_model(profile, source.config.max_position_embeddings)
        target = target_dir(args.out, source.name, profile.name)
        if args.print_deps:
            print(json.dumps(dependencies(source, profile, target), indent=1))
            return 0
        log(f"kvplan: {source.name} ({source.kind}, {source.config.num_layers} layers, {profile.dtype}) "
            f"with profile {profile.name} -> {target}")
        header = {"model": {"name": source.name, "kind": source.kind,
                            "path": str(source.path) if source.path else None,
                            "config": source.config.to_dict(), "fingerprint": source.fingerprint},
                  "profile": profile.to_dict(),
                  "stages_requested": args.stop_after or ("validate" if args.validate else "engines")}
        from .manifest import target_lock
        t0 = time.perf_counter()
        with target_lock(target, log=log):
            stages = build_stages(source, profile, target, args, log)
            Pipeline(target, header, log=log).run(stages, force=args.force)
        log(f"kvplan: finished in {time.perf_counter() - t0:.1f} s; manifest: {target / 'manifest.json'}")
        if args.validate:
            from .validate import main as validate_main
            return validate_main(["--profile", args.profile, "--model", args.model, "--out", str(args.out)])
        return 0
    except (UserError, ModelError, ConfigError, profiles_mod.ProfileError, ExportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no partial artifact was kept; the manifest does not claim the interrupted stage",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
