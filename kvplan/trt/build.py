"""Build a TensorRT / TensorRT-RTX engine (``.plan``) from an exported decoder ONNX.

One optimization profile per ``Shapes`` of the build profile (every input's
min/opt/max derived from N and lastSum), strongly typed networks (precision is the
ONNX graph's dtypes), atomic plan writes, timing-cache reuse where the backend has
one, and a JSON-serialisable record of what was built.

TensorRT-RTX builds on a CPU-only machine but cannot deserialize engines there; every
figure that needs a deserialized engine is recorded as null with the reason.
"""
from __future__ import annotations

import shlex
import threading
import time
from pathlib import Path
from typing import Any

from kvplan.fileio import atomic_file
from kvplan.manifest import sha256_file
from kvplan.pipeline import trim_heap
from kvplan.profiles import Profile
from kvplan.trt.backend import Backend
from kvplan.trt.callbacks import Log, Pending, interrupts_cancel, make_logger, make_progress_monitor
from kvplan.trt.errors import BuildError
from kvplan.trt.mapped_weights import MappedWeights
from kvplan.trt.memory import memory_record
from kvplan.trt.network import allow_decomposed_attention, check_network_inputs, network_summary, parse
from kvplan.trt.options import configure, load_timing_cache, save_timing_cache, timing_cache_supported
from kvplan.trt.plan_io import host_code_allowed
from kvplan.trt.shapes import dims, shapes_for
from kvplan.trt.trtexec import trtexec_command

# The builder frees and allocates in bursts; returning what it freed this often took the default
# model's build from 1155 to 930 MiB peak RSS (50 ms: 960-1010), at no cost in build time.
RETURN_INTERVAL_S = 0.01


class MemoryReturned:
    """While the builder runs (with the GIL released), every ``interval`` s: drop the mapped weight
    pages it has read from this process (it keeps its own copy) and hand the heap pages it has
    freed back to the OS. glibc keeps freed pages in its arenas until a trim; without one, the
    builder's peak RSS includes much of what it had already freed."""

    def __init__(self, weights: MappedWeights | None, interval: float = RETURN_INTERVAL_S):
        self.weights, self.interval, self.rounds = weights, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kvplan-return-memory", daemon=True)

    def _return(self) -> None:
        if self.weights is not None:
            self.weights.release()
        trim_heap()
        self.rounds += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._return()

    def __enter__(self) -> "MemoryReturned":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._return()


def _add_profiles(builder, config, shapes: dict, profile: Profile, onnx_path: Path, logger,
                  extra_memory_target: float | None = None) -> dict:
    """One optimization profile per Shapes, in the profile file's order (index = position);
    returns the shapes the builder took, per profile and input.

    ``extra_memory_target`` (0..1, None: unset) is the builder's hint for the weight memory each
    profile after the first may add. TensorRT-RTX 1.7 builds the same plan size with 0.0 as without
    (bench/weight_copies.py), so it is not set by default."""
    record: dict[str, dict[str, dict[str, list[int]]]] = {}
    for k, sp in enumerate(profile.shapes):
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes[sp.name].items():
            opt_profile.set_shape(name, lo, opt, hi)
        if k and extra_memory_target is not None:
            if not hasattr(opt_profile, "extra_memory_target"):
                raise BuildError(f"{onnx_path}: this TensorRT has no IOptimizationProfile.extra_memory_target")
            opt_profile.extra_memory_target = float(extra_memory_target)
        index = config.add_optimization_profile(opt_profile)
        if index < 0:
            raise BuildError(f"{onnx_path}: optimization profile {sp.name!r} was rejected: "
                             + "; ".join(logger.errors[-3:]))
        record[sp.name] = {
            name: dict(zip(("min", "opt", "max"), (dims(s) for s in opt_profile.get_shape(name))))
            for name in shapes[sp.name]}
    return record


def _attach_timing_cache(config, backend: Backend, timing_cache: Path | None, log: Log) -> dict:
    record: dict[str, Any] = {"path": str(timing_cache) if timing_cache else None}
    tc_ok, tc_why = timing_cache_supported(backend)
    if timing_cache is None:
        record.update(supported=tc_ok, used=False)
    elif not tc_ok:
        record.update(supported=False, used=False, why=tc_why)
        log(f"[build] note: {tc_why}; not writing {timing_cache.name}")
    else:
        _, loaded = load_timing_cache(config, timing_cache, log)
        record.update(supported=True, used=True, loaded_bytes=loaded)
        log(f"[build] timing cache: {'reusing ' + str(loaded) + ' bytes from' if loaded else 'new'} {timing_cache}")
    return record


def _attach_progress_monitor(trt, config, log: Log, pending: Pending):
    if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = make_progress_monitor(trt, log, pending)
        config.progress_monitor = monitor
        return monitor
    log("[build] note: this backend has no progress monitor; building silently")
    return None


def _build_into(trt, builder, network, config, f, pending: Pending) -> tuple[bool, int]:
    """Build and write the plan to the open file ``f``; returns (built, bytes the builder handed over).

    Streamed where the builder can (TensorRT 10.x, TensorRT-RTX): the serialized plan, as large
    as the weights once per optimization profile, is then never held in host memory whole.
    TensorRT ignores an exception raised by the stream writer and a short write alike (a full
    disk left a truncated plan that the build called a success), so the writer keeps the error
    for build_engine to raise and counts what it was given, to be checked against the file.
    """
    handed = 0
    if hasattr(builder, "build_serialized_network_to_stream") and hasattr(trt, "IStreamWriter"):
        class FileWriter(trt.IStreamWriter):
            def __init__(self):
                trt.IStreamWriter.__init__(self)

            def write(self, data) -> int:
                nonlocal handed
                handed += len(data)
                try:
                    return f.write(data)
                except BaseException as e:     # never raise into TensorRT
                    pending.keep(e)
                    return 0

        return bool(builder.build_serialized_network_to_stream(network, config, FileWriter())), handed
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        return False, 0
    f.write(serialized)
    return True, serialized.nbytes


def _parsed(trt, backend: Backend, onnx_path: Path, contract: dict, logger, log: Log):
    """The graph parsed into a network that honours the I/O contract: (builder, network, parser,
    mapped weights or None, the network's summary)."""
    builder, network, parser, weights = parse(trt, backend, onnx_path, logger, log)
    if weights is not None:
        log(f"[build] parser reads {weights.mapped_bytes / 2**20:.1f} MiB of weights in place "
            f"({len(weights.entries)} tensors, memory-mapped)")
    check_network_inputs(network, contract, onnx_path)
    attention = allow_decomposed_attention(trt, network)
    if attention:
        log(f"[build] {attention} fused attention layer(s), decomposable where no fused kernel fits")
    summary = network_summary(network)
    log(f"[build] {onnx_path.name}: {summary['layers']} layers, {network.num_inputs} inputs, "
        f"{network.num_outputs} outputs ({backend.name} {backend.version})")
    return builder, network, parser, weights, summary


def _sources(backend: Backend, onnx_path: Path) -> dict:
    """What the plan was built from and with."""
    data_file = onnx_path.parent / (onnx_path.name + ".data")
    return {"backend": backend.name, "backend_version": backend.version, "onnx": str(onnx_path),
            "onnx_sha256": sha256_file(onnx_path),
            "onnx_data_sha256": sha256_file(data_file) if data_file.is_file() else None}


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile, contract: dict, backend: Backend,
                 timing_cache: Path | None, log: Log = print, *, extra_memory_target: float | None = None) -> dict:
    """Parse ``onnx_path``, build one optimization profile per Shapes, write ``plan_path`` atomically.

    Returns a JSON-serialisable record of the build. Raises BuildError (naming the file)
    on parser errors, a contract mismatch or a failed build; on any exception no plan and
    no temp file are left behind by this call.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not backend.can_build:
        raise BuildError(f"{onnx_path}: {backend.name} {backend.version} cannot build here: its builder needs a "
                         f"CUDA GPU ({backend.why_not_run}); TensorRT-RTX builds on a CPU-only machine "
                         f"(--backend tensorrt-rtx)")
    trt = backend.module
    timing_cache = Path(timing_cache) if timing_cache is not None else None
    pending = Pending()
    logger = make_logger(trt, log, pending)
    t_start = time.perf_counter()

    builder, network, parser, weights, summary = _parsed(trt, backend, onnx_path, contract, logger, log)

    config = builder.create_builder_config()
    options, notes = configure(trt, backend, config, profile.engine, profile.source, log)
    shapes = shapes_for(contract, profile)
    profiles_record = _add_profiles(builder, config, shapes, profile, onnx_path, logger, extra_memory_target)
    if extra_memory_target is not None:
        options["extra_memory_target"] = float(extra_memory_target)
    tc_record = _attach_timing_cache(config, backend, timing_cache, log)
    monitor = _attach_progress_monitor(trt, config, log, pending)

    t0 = time.perf_counter()
    with atomic_file(plan_path) as f, MemoryReturned(weights), interrupts_cancel(pending):
        built, handed = _build_into(trt, builder, network, config, f, pending)
        if pending.exc is not None:
            raise pending.exc           # Ctrl-C (it cancelled the build) or the plan write's own error
        if not built:
            errors = logger.errors[-8:] or ["(the builder logged no error)"]
            raise BuildError(f"{onnx_path}: {backend.name} engine build failed:\n  " + "\n  ".join(errors))
        plan_bytes = f.tell()
        if plan_bytes != handed or plan_bytes == 0:
            raise BuildError(f"{plan_path}: the plan was not written whole ({plan_bytes} of {handed} bytes); "
                             f"is the disk full?")
    build_seconds = time.perf_counter() - t0
    log(f"[build] wrote {plan_path} ({plan_bytes} bytes, {build_seconds:.1f} s)")

    if tc_record.get("used"):
        tc_record["saved_bytes"] = save_timing_cache(config, timing_cache)

    memory = memory_record(trt, backend, onnx_path, plan_path, logger, [sp.name for sp in profile.shapes],
                           host_code_allowed(options))

    argv, tool_notes = trtexec_command(backend, onnx_path, plan_path, profile.engine, shapes,
                                       timing_cache if tc_record.get("used") else None)
    record = {
        **_sources(backend, onnx_path),
        "plan": plan_path.name,
        "plan_bytes": plan_bytes,
        "build_seconds": round(build_seconds, 3),
        "total_seconds": round(time.perf_counter() - t_start, 3),
        "profiles": profiles_record,
        "options": options,
        "notes": notes,
        "timing_cache": tc_record,
        "memory": memory,
        "network": summary,
        "progress": monitor.summary() if monitor is not None else None,
        "weights_mapped_bytes": weights.mapped_bytes if weights is not None else 0,
        "trtexec": shlex.join(argv),
        "trtexec_notes": tool_notes,
    }
    del network, parser, weights      # the parser first: it points into the mapped weights
    return record
