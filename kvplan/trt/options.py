"""Builder configuration: optimization level, workspace, hardware/version compatibility,
target compute capabilities, profiling verbosity, and the timing cache."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from kvplan.fileio import write_atomic
from kvplan.profiles import Engine
from kvplan.trt.backend import Backend
from kvplan.trt.callbacks import Log
from kvplan.trt.errors import BuildError

HW_COMPAT = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}


def configure(trt, backend: Backend, config, engine: Engine, where: str, log: Log) -> tuple[dict, list[str]]:
    """Set the profile's ``[engine]`` builder options on ``config``; ``where``: the profile file, for errors."""
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log(f"[build] note: {msg}")

    opts: dict[str, Any] = {"strongly_typed": True, "optimization_level": engine.optimization_level}
    config.builder_optimization_level = engine.optimization_level

    if engine.workspace_mib > 0:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, engine.workspace_mib << 20)
        opts["workspace_mib"] = engine.workspace_mib
    else:
        opts["workspace_mib"] = None   # backend default

    # Hardware compatibility: TensorRT only (TensorRT-RTX engines are portable across its GPUs
    # by design and its builder logs "unsupported" for the setter).
    opts["hardware_compatibility"] = engine.hardware_compatibility
    if engine.hardware_compatibility != "none":
        level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), HW_COMPAT[engine.hardware_compatibility], None)
        if backend.is_rtx or level is None or not hasattr(config, "hardware_compatibility_level"):
            note(f"hardware_compatibility={engine.hardware_compatibility!r} is not supported by "
                 f"{backend.name} {backend.version}; skipped")
            opts["hardware_compatibility"] = "none (skipped)"
        else:
            config.hardware_compatibility_level = level

    # Version compatibility: TensorRT's lean-runtime engines. TensorRT-RTX's builder fails
    # with it (it looks for libnvinfer_lean), so it is skipped there.
    opts["version_compatible"] = engine.version_compatible
    if engine.version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if backend.is_rtx or flag is None:
            note(f"version_compatible is not supported by {backend.name} {backend.version}; skipped")
            opts["version_compatible"] = False
        else:
            config.set_flag(flag)

    # Target compute capabilities: TensorRT-RTX only.
    opts["compute_capabilities"] = list(engine.compute_capabilities)
    if engine.compute_capabilities:
        cc_enum = getattr(trt, "ComputeCapability", None)
        if cc_enum is None or not hasattr(config, "set_compute_capability"):
            note(f"compute_capabilities {list(engine.compute_capabilities)} apply to TensorRT-RTX only; "
                 f"{backend.name} builds for the GPU it runs on; skipped")
            opts["compute_capabilities"] = []
        else:
            members = []
            for cc in engine.compute_capabilities:
                member = getattr(cc_enum, "SM" + cc.replace(".", ""), None)
                if member is None:
                    known = [m for m in cc_enum.__members__ if m.startswith("SM")]
                    raise BuildError(f"{where}: engine.compute_capabilities: {cc!r} is not a compute "
                                     f"capability {backend.name} {backend.version} builds for (known: {', '.join(known)})")
                members.append(member)
            config.num_compute_capabilities = len(members)
            for i, m in enumerate(members):
                if not config.set_compute_capability(m, i):
                    raise BuildError(f"{where}: engine.compute_capabilities: {backend.name} refused {m.name}")

    # Detailed layer information in the plan, for the engine inspector.
    verbosity = getattr(getattr(trt, "ProfilingVerbosity", None), "DETAILED", None)
    if verbosity is not None and hasattr(config, "profiling_verbosity"):
        config.profiling_verbosity = verbosity
        opts["profiling_verbosity"] = "DETAILED"
    return opts, notes


def timing_cache_supported(backend: Backend) -> tuple[bool, str]:
    if backend.is_rtx:
        return False, (f"TensorRT-RTX {backend.version}: timing cache operations are no-ops (its builder does no "
                       f"kernel timing ahead of time; kernels are chosen/JIT-compiled on the target GPU, "
                       f"which TensorRT-RTX caches at run time with its runtime cache)")
    return True, ""


def load_timing_cache(config, path: Path | None, log: Log) -> tuple[Any, int]:
    """Create the config's timing cache from ``path`` when it exists (else empty) and attach it."""
    data = b""
    if path is not None and path.is_file():
        data = path.read_bytes()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            cache = config.create_timing_cache(data)
        except Exception:
            cache = None
        if cache is None and data:
            log(f"[build] timing cache {path} is unreadable; starting an empty one")
            data = b""
            cache = config.create_timing_cache(b"")
        config.set_timing_cache(cache, False)
    return cache, len(data)


def save_timing_cache(config, path: Path) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        blob = config.get_timing_cache().serialize()
    return write_atomic(path, blob)
