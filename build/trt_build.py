"""Build TensorRT / TensorRT-RTX engines (``.plan``) from an exported decoder ONNX.

One optimization profile per ``ShapeProfile`` of the build profile (every input's
min/opt/max derived from N and lastSum), strongly typed networks (precision is the
ONNX graph's dtypes), atomic plan writes, timing-cache reuse where the backend has
one, and a JSON-serialisable record of what was built.

TensorRT-RTX builds on a CPU-only machine but cannot deserialize engines there; every
figure that needs a deserialized engine is recorded as null with the reason.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import time
import warnings
from pathlib import Path
from typing import Any, Callable

from .backend import Backend
from .profiles import Profile, ShapeProfile

Log = Callable[[str], None]

SYMBOLS = ("N", "lastSum", "sumN")
HW_COMPAT = {"none": "NONE", "ampere_plus": "AMPERE_PLUS", "same_compute_capability": "SAME_COMPUTE_CAPABILITY"}
TRTEXEC_HW_COMPAT = {"ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
              "bool": "BOOL", "int8": "INT8"}
# Memory lines the builder logs (INFO) once per optimization profile, then weights once.
_MEMORY_LINE = re.compile(r"^(Total Host Persistent Memory|Total Device Persistent Memory|Max Scratch Memory|"
                          r"Total Activation Memory|Total Weights Memory): (\d+) bytes")


class BuildError(RuntimeError):
    pass


# --------------------------------------------------------------------------- shapes

def shapes_for(contract: dict, profile: Profile) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """profile name -> input name -> (min, opt, max) shapes.

    Symbolic axes of the contract (``N``, ``lastSum``, ``sumN``) take the ShapeProfile's
    ranges, sumN = N + lastSum at each of min/opt/max; integer axes (batch, heads, ...)
    are fixed.
    """
    inputs = contract["inputs"]
    out: dict[str, dict[str, tuple[tuple[int, ...], ...]]] = {}
    for sp in profile.shapes:
        ranges = {"N": sp.N, "lastSum": sp.lastSum, "sumN": sp.sumN}
        per_input = {}
        for name, info in inputs.items():
            triple = []
            for which in ("min", "opt", "max"):
                dims = []
                for d in info["shape"]:
                    if isinstance(d, str):
                        if d not in ranges:
                            raise BuildError(f"input {name!r}: unknown symbolic axis {d!r} (known: {', '.join(SYMBOLS)})")
                        dims.append(int(getattr(ranges[d], which)))
                    else:
                        dims.append(int(d))
                triple.append(tuple(dims))
            per_input[name] = tuple(triple)
        out[sp.name] = per_input
    return out


# --------------------------------------------------------------------------- logging / progress

class _Pending:
    """An exception raised inside a TensorRT callback, kept to cancel the build and re-raise after."""

    def __init__(self):
        self.exc: BaseException | None = None

    def keep(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc


def _make_logger(trt, log: Log, pending: _Pending):
    Severity = trt.ILogger.Severity

    class _Logger(trt.ILogger):
        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []
            self.messages: list[tuple[str, str]] = []

        def log(self, severity, msg):  # called from TensorRT threads too: never raise
            try:
                if severity > Severity.INFO:
                    return
                self.messages.append((severity.name, msg))
                if severity <= Severity.ERROR:
                    self.errors.append(msg)
                if severity <= Severity.WARNING:
                    log(f"[trt] {severity.name.lower()}: {msg}")
            except BaseException as e:  # e.g. KeyboardInterrupt inside log(): cancel at the next step
                pending.keep(e)

    return _Logger()


def _make_progress_monitor(trt, log: Log, pending: _Pending, max_depth: int = 2, step_interval: float = 5.0):
    """An IProgressMonitor that logs phase start/finish (nested, up to ``max_depth``) and
    throttled step progress; any exception raised while logging (KeyboardInterrupt from
    Ctrl-C included) cancels the build and is re-raised by build_engine."""

    class _Progress(trt.IProgressMonitor):
        def __init__(self):
            trt.IProgressMonitor.__init__(self)
            self.depth: dict[str, int] = {}
            self.steps: dict[str, int] = {}
            self.started: dict[str, float] = {}
            self.last_step_log: dict[str, float] = {}
            self.phases = 0
            self.step_count = 0
            self.deepest = 0

        def phase_start(self, phase_name, parent_phase, num_steps):
            try:
                depth = self.depth.get(parent_phase, -1) + 1 if parent_phase else 0
                self.depth[phase_name] = depth
                self.steps[phase_name] = num_steps
                self.started[phase_name] = self.last_step_log[phase_name] = time.perf_counter()
                self.phases += 1
                self.deepest = max(self.deepest, depth)
                if depth < max_depth:
                    log(f"[build] {'  ' * depth}{phase_name} ({num_steps} steps)")
            except BaseException as e:
                pending.keep(e)

        def step_complete(self, phase_name, step):
            try:
                self.step_count += 1
                if pending.exc is not None:
                    return False
                depth = self.depth.get(phase_name, 0)
                now = time.perf_counter()
                if depth < max_depth and now - self.last_step_log.get(phase_name, now) >= step_interval:
                    self.last_step_log[phase_name] = now
                    log(f"[build] {'  ' * depth}  {phase_name}: step {step + 1}/{self.steps.get(phase_name, '?')}")
                return True
            except BaseException as e:
                pending.keep(e)
                return False

        def phase_finish(self, phase_name):
            try:
                depth = self.depth.get(phase_name, 0)
                if depth < max_depth:
                    took = time.perf_counter() - self.started.get(phase_name, time.perf_counter())
                    log(f"[build] {'  ' * depth}{phase_name} done ({took:.2f} s)")
            except BaseException as e:
                pending.keep(e)

        def summary(self) -> dict:
            return {"phases": self.phases, "steps": self.step_count, "max_depth": self.deepest}

    return _Progress()


# --------------------------------------------------------------------------- files

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_write(path: Path, data) -> int:
    """Write ``data`` (bytes or a buffer) to ``path`` via a same-directory temp file, fsync, rename.

    On any exception, KeyboardInterrupt included, the temp file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
            size = f.tell()
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
    return size


def onnx_weight_bytes(onnx_path: Path) -> int:
    """Bytes of the graph's initializers and Constant tensors (external data is not read)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_path), load_external_data=False)

    def size(t) -> int:
        n = 1
        for d in t.dims:
            n *= d
        return n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    total = sum(size(t) for t in model.graph.initializer)
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    total += size(a.t)
    return total


# --------------------------------------------------------------------------- network

def _parse(trt, backend: Backend, onnx_path: Path, logger):
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path}: no such ONNX file")
    builder = trt.Builder(logger)
    network = builder.create_network(backend.strongly_typed_flag)
    parser = trt.OnnxParser(network, logger)
    # parse_from_file, not parse(bytes): external data files are found next to the graph.
    if not parser.parse_from_file(str(onnx_path)):
        lines = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            where = ""
            if e.node() >= 0 or e.node_name():
                op = e.node_operator() if hasattr(e, "node_operator") else ""
                where = f" at node {e.node()} {e.node_name()!r}" + (f" ({op})" if op else "")
            lines.append(f"{e.code().name}{where}: {e.desc()}")
        if not lines:
            lines = logger.errors[-5:] or ["(no parser errors reported)"]
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(lines))
    if network.num_inputs == 0 or network.num_outputs == 0 or network.num_layers == 0:
        # Arbitrary bytes can decode as an (empty) protobuf message: the parser then "succeeds".
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser found no graph ({network.num_inputs} inputs, "
                         f"{network.num_outputs} outputs, {network.num_layers} layers): not an ONNX model, "
                         f"or a corrupted one")
    return builder, network, parser


def _dims(shape) -> list[int]:
    return [int(d) for d in shape]


def network_summary(network) -> dict:
    types: dict[str, int] = {}
    for i in range(network.num_layers):
        t = network.get_layer(i).type.name
        types[t] = types.get(t, 0) + 1

    def io(t):
        return {"shape": _dims(t.shape), "dtype": t.dtype.name}

    return {
        "layers": network.num_layers,
        "layer_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        "inputs": {network.get_input(i).name: io(network.get_input(i)) for i in range(network.num_inputs)},
        "outputs": {network.get_output(i).name: io(network.get_output(i)) for i in range(network.num_outputs)},
    }


def check_network_inputs(network, contract: dict, onnx_path: Path) -> None:
    """The parsed network's inputs must be the contract's: names, ranks, fixed dims, dtypes."""
    want = contract["inputs"]
    have = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    problems = []
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing:
        problems.append(f"missing inputs {missing}")
    if extra:
        problems.append(f"unexpected inputs {extra}")
    for name, info in want.items():
        t = have.get(name)
        if t is None:
            continue
        dims = _dims(t.shape)
        if len(dims) != len(info["shape"]):
            problems.append(f"{name}: rank {len(dims)} {dims}, contract {info['shape']}")
            continue
        for axis, (d, c) in enumerate(zip(dims, info["shape"])):
            if isinstance(c, int) and d != -1 and d != c:
                problems.append(f"{name}: axis {axis} is {d}, contract {c}")
            if isinstance(c, str) and d != -1:
                problems.append(f"{name}: axis {axis} ({c}) is static {d} in the graph; it must be dynamic")
        want_dt = TRT_DTYPES.get(info.get("dtype", ""))
        if want_dt and t.dtype.name != want_dt:
            problems.append(f"{name}: dtype {t.dtype.name}, contract {info['dtype']}")
    if problems:
        raise BuildError(f"{onnx_path}: network inputs do not match the I/O contract: " + "; ".join(problems))


# --------------------------------------------------------------------------- builder options

def _configure(trt, backend: Backend, config, profile: Profile, log: Log) -> tuple[dict, list[str]]:
    notes: list[str] = []

    def note(msg: str) -> None:
        notes.append(msg)
        log(f"[build] note: {msg}")

    opts: dict[str, Any] = {"strongly_typed": True, "optimization_level": profile.optimization_level}
    config.builder_optimization_level = profile.optimization_level

    if profile.workspace_mib > 0:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, profile.workspace_mib << 20)
        opts["workspace_mib"] = profile.workspace_mib
    else:
        opts["workspace_mib"] = None   # backend default

    # Hardware compatibility: TensorRT only (TensorRT-RTX engines are portable across its GPUs
    # by design and its builder logs "unsupported" for the setter).
    opts["hardware_compatibility"] = profile.hardware_compatibility
    if profile.hardware_compatibility != "none":
        level = getattr(getattr(trt, "HardwareCompatibilityLevel", None), HW_COMPAT[profile.hardware_compatibility], None)
        if backend.is_rtx or level is None or not hasattr(config, "hardware_compatibility_level"):
            note(f"hardware_compatibility={profile.hardware_compatibility!r} is not supported by "
                 f"{backend.name} {backend.version}; skipped")
            opts["hardware_compatibility"] = "none (skipped)"
        else:
            config.hardware_compatibility_level = level

    # Version compatibility: TensorRT's lean-runtime engines. TensorRT-RTX's builder fails
    # with it (it looks for libnvinfer_lean), so it is skipped there.
    opts["version_compatible"] = profile.version_compatible
    if profile.version_compatible:
        flag = getattr(trt.BuilderFlag, "VERSION_COMPATIBLE", None)
        if backend.is_rtx or flag is None:
            note(f"version_compatible is not supported by {backend.name} {backend.version}; skipped")
            opts["version_compatible"] = False
        else:
            config.set_flag(flag)

    # Target compute capabilities: TensorRT-RTX only.
    opts["compute_capabilities"] = list(profile.compute_capabilities)
    if profile.compute_capabilities:
        cc_enum = getattr(trt, "ComputeCapability", None)
        if cc_enum is None or not hasattr(config, "set_compute_capability"):
            note(f"compute_capabilities {list(profile.compute_capabilities)} apply to TensorRT-RTX only; "
                 f"{backend.name} builds for the GPU it runs on; skipped")
            opts["compute_capabilities"] = []
        else:
            members = []
            for cc in profile.compute_capabilities:
                member = getattr(cc_enum, "SM" + cc.replace(".", ""), None)
                if member is None:
                    known = [m for m in cc_enum.__members__ if m.startswith("SM")]
                    raise BuildError(f"{profile.source}: engine.compute_capabilities: {cc!r} is not a compute "
                                     f"capability {backend.name} {backend.version} builds for (known: {', '.join(known)})")
                members.append(member)
            config.num_compute_capabilities = len(members)
            for i, m in enumerate(members):
                if not config.set_compute_capability(m, i):
                    raise BuildError(f"{profile.source}: engine.compute_capabilities: {backend.name} refused {m.name}")

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
    return _atomic_write(path, blob)


# --------------------------------------------------------------------------- trtexec

def _shape_arg(shapes: dict[str, tuple], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in shapes.items())


def trtexec_command(backend: Backend, onnx_path: Path, plan_path: Path, profile: Profile,
                    shapes: dict[str, dict[str, tuple]], timing_cache: Path | None) -> tuple[list[str], list[str]]:
    """The equivalent command line of the backend's CLI tool (trtexec / tensorrt_rtx), and notes."""
    argv = [backend.tool, f"--onnx={onnx_path}", f"--saveEngine={plan_path}"]
    notes = []
    if not backend.is_rtx and backend.strongly_typed_flag:
        argv.append("--stronglyTyped")     # TensorRT 10.x; TensorRT 11 is always strongly typed
    for i, (name, per_input) in enumerate(shapes.items()):
        # trtexec: each --profile=<i> opens a new optimization profile for the shape flags after it.
        argv += [f"--profile={i}", f"--minShapes={_shape_arg(per_input, 0)}",
                 f"--optShapes={_shape_arg(per_input, 1)}", f"--maxShapes={_shape_arg(per_input, 2)}"]
    if profile.workspace_mib > 0:
        argv.append(f"--memPoolSize=workspace:{profile.workspace_mib}M")
    if backend.is_rtx:
        notes.append("tensorrt_rtx: networks are always strongly typed; no timing cache; builder optimization "
                     "level and compute capabilities are set through the API (flags not given here)")
    else:
        argv.append(f"--builderOptimizationLevel={profile.optimization_level}")
        if timing_cache is not None:
            argv.append(f"--timingCacheFile={timing_cache}")
        if profile.hardware_compatibility in TRTEXEC_HW_COMPAT:
            argv.append(f"--hardwareCompatibilityLevel={TRTEXEC_HW_COMPAT[profile.hardware_compatibility]}")
        if profile.version_compatible:
            argv.append("--versionCompatible")
        argv.append("--skipInference")
    return argv, notes


# --------------------------------------------------------------------------- build

def _memory_from_log(messages: list[tuple[str, str]], profile_names: list[str]) -> dict | None:
    per_profile: list[dict[str, int]] = []
    weights = None
    for _, msg in messages:
        m = _MEMORY_LINE.match(msg)
        if not m:
            continue
        key = m.group(1).lower().replace(" ", "_") + "_bytes"
        value = int(m.group(2))
        if key == "total_weights_memory_bytes":
            weights = value
            continue
        if key == "total_host_persistent_memory_bytes" or not per_profile:
            per_profile.append({})
        per_profile[-1][key] = value
    if not per_profile and weights is None:
        return None
    if len(per_profile) == len(profile_names):
        keyed: Any = dict(zip(profile_names, per_profile))
    else:  # not one block per profile: keep them in log order
        keyed = per_profile
    return {"per_profile": keyed,
            "total_weights_memory_bytes": weights,
            "source": "the builder's log (estimates from the build, no engine needed)"}


def _engine_memory(trt, backend: Backend, plan_bytes, logger, n_profiles: int) -> dict:
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise BuildError("the runtime could not deserialize the plan it just built: " + "; ".join(logger.errors[-3:]))
    out: dict[str, Any] = {}
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:
        size = getattr(engine, "device_memory_size", None)
    out["device_memory_size"] = int(size) if size is not None else None
    get = getattr(engine, "get_device_memory_size_for_profile_v2", None) or \
        getattr(engine, "get_device_memory_size_for_profile", None)
    out["device_memory_size_per_profile"] = [int(get(i)) for i in range(n_profiles)] if get else None
    stat = getattr(getattr(trt, "EngineStat", None), "TOTAL_WEIGHTS_SIZE", None)
    out["engine_weights_bytes"] = int(engine.get_engine_stat(stat)) if stat is not None and hasattr(engine, "get_engine_stat") else None
    return out


def build_engine(onnx_path: Path, plan_path: Path, profile: Profile, contract: dict, backend: Backend,
                 timing_cache: Path | None, log: Log = print) -> dict:
    """Parse ``onnx_path``, build one optimization profile per ShapeProfile, write ``plan_path`` atomically.

    Returns a JSON-serialisable record of the build. Raises BuildError (naming the file)
    on parser errors, a contract mismatch or a failed build; on any exception no plan and
    no temp file are left behind by this call.
    """
    trt = backend.module
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    timing_cache = Path(timing_cache) if timing_cache is not None else None
    pending = _Pending()
    logger = _make_logger(trt, log, pending)
    t_start = time.perf_counter()

    builder, network, parser = _parse(trt, backend, onnx_path, logger)
    check_network_inputs(network, contract, onnx_path)
    summary = network_summary(network)
    log(f"[build] {onnx_path.name}: {summary['layers']} layers, {network.num_inputs} inputs, "
        f"{network.num_outputs} outputs ({backend.name} {backend.version})")

    config = builder.create_builder_config()
    options, notes = _configure(trt, backend, config, profile, log)

    # One optimization profile per ShapeProfile, in the profile file's order (index = position).
    shapes = shapes_for(contract, profile)
    profiles_record: dict[str, dict[str, dict[str, list[int]]]] = {}
    for sp in profile.shapes:
        opt_profile = builder.create_optimization_profile()
        for name, (lo, opt, hi) in shapes[sp.name].items():
            opt_profile.set_shape(name, lo, opt, hi)
        index = config.add_optimization_profile(opt_profile)
        if index < 0:
            raise BuildError(f"{onnx_path}: optimization profile {sp.name!r} was rejected: "
                             + "; ".join(logger.errors[-3:]))
        profiles_record[sp.name] = {
            name: dict(zip(("min", "opt", "max"), (_dims(s) for s in opt_profile.get_shape(name))))
            for name in shapes[sp.name]}

    # Timing cache.
    tc_record: dict[str, Any] = {"path": str(timing_cache) if timing_cache else None}
    tc_ok, tc_why = timing_cache_supported(backend)
    if timing_cache is None:
        tc_record.update(supported=tc_ok, used=False)
    elif not tc_ok:
        tc_record.update(supported=False, used=False, why=tc_why)
        log(f"[build] note: {tc_why}; not writing {timing_cache.name}")
    else:
        _, loaded = load_timing_cache(config, timing_cache, log)
        tc_record.update(supported=True, used=True, loaded_bytes=loaded)
        log(f"[build] timing cache: {'reusing ' + str(loaded) + ' bytes from' if loaded else 'new'} {timing_cache}")

    monitor = None
    if hasattr(trt, "IProgressMonitor") and hasattr(config, "progress_monitor"):
        monitor = _make_progress_monitor(trt, log, pending)
        config.progress_monitor = monitor
    else:
        log("[build] note: this backend has no progress monitor; building silently")

    t0 = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    build_seconds = time.perf_counter() - t0
    if pending.exc is not None:
        raise pending.exc           # e.g. KeyboardInterrupt during the build: it cancelled the build
    if serialized is None:
        errors = logger.errors[-8:] or ["(the builder logged no error)"]
        raise BuildError(f"{onnx_path}: {backend.name} engine build failed:\n  " + "\n  ".join(errors))

    plan_bytes = _atomic_write(plan_path, serialized)
    log(f"[build] wrote {plan_path} ({plan_bytes} bytes, {build_seconds:.1f} s)")

    if tc_record.get("used"):
        tc_record["saved_bytes"] = save_timing_cache(config, timing_cache)

    # Memory figures.
    memory: dict[str, Any] = {"weights_bytes_onnx": onnx_weight_bytes(onnx_path),
                              "builder_reported": _memory_from_log(logger.messages, [sp.name for sp in profile.shapes])}
    if memory["builder_reported"] is None:
        memory["builder_reported_why"] = "the builder logged no memory figures"
    if backend.can_run:
        try:
            memory.update(_engine_memory(trt, backend, serialized, logger, len(profile.shapes)))
        except Exception as e:  # the plan is built; the figures are a bonus
            memory.update(device_memory_size=None, device_memory_size_per_profile=None,
                          engine_memory_why=f"deserialization failed: {e}")
    else:
        memory.update(device_memory_size=None, device_memory_size_per_profile=None, engine_weights_bytes=None,
                      engine_memory_why=f"needs a deserialized engine; {backend.why_not_run}")

    argv, tool_notes = trtexec_command(backend, onnx_path, plan_path, profile, shapes,
                                       timing_cache if tc_record.get("used") else None)
    data_file = onnx_path.parent / (onnx_path.name + ".data")
    record = {
        "backend": backend.name,
        "backend_version": backend.version,
        "onnx": str(onnx_path),
        "onnx_sha256": _sha256(onnx_path),
        "onnx_data_sha256": _sha256(data_file) if data_file.is_file() else None,
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
        "trtexec": shlex.join(argv),
        "trtexec_notes": tool_notes,
    }
    del parser
    return record


# --------------------------------------------------------------------------- inspect

def _onnx_for_plan(plan: Path) -> Path | None:
    manifest = plan.parent / "manifest.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            for key in ("onnx", "fused_onnx", "source_onnx"):
                value = data.get(key) if isinstance(data, dict) else None
                if isinstance(value, str):
                    p = Path(value)
                    p = p if p.is_absolute() else manifest.parent / p
                    if p.is_file():
                        return p
        except (OSError, ValueError):
            pass
    for cand in (plan.with_suffix(".onnx"), plan.parent / "decoder.fused.onnx", plan.parent / "decoder.onnx"):
        if cand.is_file():
            return cand
    return None


def layer_table(network) -> list[dict]:
    rows = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = []
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            outs.append({"name": t.name, "dtype": t.dtype.name, "shape": _dims(t.shape)})
        rows.append({"index": i, "name": layer.name, "type": layer.type.name, "outputs": outs})
    return rows


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

    pending = _Pending()
    logger = _make_logger(trt, lambda msg: None, pending)
    if onnx_path is None:
        log(f"{path}: no source ONNX found next to it ({path.stem}.onnx, decoder.fused.onnx, decoder.onnx); "
            f"no network layer summary")
        result["network"] = None
    else:
        _, network, _parser = _parse(trt, backend, onnx_path, logger)
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
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BuildError(f"{path}: could not deserialize the plan: " + "; ".join(logger.errors[-3:]))
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


# --------------------------------------------------------------------------- runtime check (GPU)

def _torch_dtype(trt, dt):
    import torch
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
             "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
    return table[dt.name]


def _check_inputs(contract: dict, sp: ShapeProfile, shapes: dict[str, tuple], dtype: str, seed: int):
    """Inputs at the profile's opt shapes: causal mask, positions lastSum.., random hidden/past."""
    import torch
    from .export import TORCH_DTYPES, causal_mask

    tdtype = TORCH_DTYPES[dtype]
    n, last = sp.N.opt, sp.lastSum.opt
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, info in contract["inputs"].items():
        shape = shapes[name][1]
        if name == "attention_mask":
            inputs[name] = causal_mask(shape[0], n, last, tdtype)
        elif name == "position_ids":
            inputs[name] = torch.arange(last, last + n, dtype=torch.int64).expand(shape[0], n).contiguous()
        else:
            dt = TORCH_DTYPES.get(info["dtype"], tdtype)
            inputs[name] = torch.randn(shape, generator=g).to(dt)
    return inputs


def _ort_run(onnx_path: Path, inputs: dict) -> dict:
    """ONNX Runtime (CPU) outputs as float32 numpy arrays. numpy has no bfloat16, so bfloat16
    tensors travel as OrtValues over their int16 bits."""
    import ctypes
    import math

    import numpy as np
    import onnxruntime as ort
    import torch
    from onnx import TensorProto

    # CUDA EP where onnxruntime-gpu has it (ONNX Runtime's CPU EP has no bfloat16 Mul/MatMul).
    providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in ort.get_available_providers()]
    sess = ort.InferenceSession(str(onnx_path), providers=providers)
    feeds = {}
    for name, t in inputs.items():
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            feeds[name] = ort.OrtValue.ortvalue_from_numpy_with_onnx_type(t.view(torch.int16).numpy(),
                                                                         TensorProto.BFLOAT16)
        else:
            feeds[name] = ort.OrtValue.ortvalue_from_numpy(t.numpy())
    names = [o.name for o in sess.get_outputs()]
    outs = sess.run_with_ort_values(names, feeds)
    result = {}
    for name, v in zip(names, outs):
        if v.data_type() == "tensor(bfloat16)":
            n = math.prod(v.shape())
            bits = np.ctypeslib.as_array((ctypes.c_int16 * n).from_address(v.data_ptr())).copy() if n else \
                np.zeros(0, np.int16)
            result[name] = torch.from_numpy(bits.reshape(v.shape())).view(torch.bfloat16).float().numpy()
        else:
            result[name] = np.asarray(v.numpy()).astype(np.float32)
    return result


def run_engine_check(plan_path: Path, profile: Profile, contract: dict, onnx_path: Path, backend: Backend,
                     log: Log = print) -> dict:
    """Run the plan at every profile's opt shapes on the GPU and compare with ONNX Runtime on ``onnx_path``.

    Without a runnable backend (no GPU, or a GPU the backend does not support) returns
    ``{"ran": False, "why": ...}``.
    """
    if not backend.can_run:
        return {"ran": False, "why": backend.why_not_run}
    import numpy as np
    import torch

    trt = backend.module
    pending = _Pending()
    logger = _make_logger(trt, log, pending)
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise BuildError(f"{plan_path}: could not deserialize the plan: " + "; ".join(logger.errors[-3:]))
    context = engine.create_execution_context()
    if context is None:
        raise BuildError(f"{plan_path}: could not create an execution context: " + "; ".join(logger.errors[-3:]))
    device = torch.device("cuda")
    stream = torch.cuda.Stream()
    tol = profile.tolerance
    shapes = shapes_for(contract, profile)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    record: dict[str, Any] = {"ran": True, "plan": str(plan_path), "onnx": str(onnx_path),
                              "atol": tol.atol, "rtol": tol.rtol, "profiles": {}}
    all_ok = True
    for index, sp in enumerate(profile.shapes):
        inputs = _check_inputs(contract, sp, shapes[sp.name], profile.dtype, seed=index)
        keep = []  # device buffers alive until the stream is done
        with torch.cuda.stream(stream):
            if not context.set_optimization_profile_async(index, stream.cuda_stream):
                raise BuildError(f"{plan_path}: could not select optimization profile {index} ({sp.name})")
            for name in input_names:
                host = inputs[name]
                if not context.set_input_shape(name, tuple(host.shape)):
                    raise BuildError(f"{plan_path}: profile {sp.name}: input {name} shape {tuple(host.shape)} refused")
                dev = host.to(device=device, dtype=_torch_dtype(trt, engine.get_tensor_dtype(name)))
                if dev.numel() == 0:      # empty past (lastSum = 0): give TensorRT a valid address anyway
                    dev = torch.empty(1, dtype=host.dtype, device=device)
                keep.append(dev)
                context.set_tensor_address(name, dev.data_ptr())
            outputs = {}
            for name in output_names:
                shape = tuple(context.get_tensor_shape(name))
                dt = _torch_dtype(trt, engine.get_tensor_dtype(name))
                buf = torch.empty(shape, dtype=dt, device=device)
                alloc = buf if buf.numel() else torch.empty(1, dtype=dt, device=device)
                keep.append(alloc)
                outputs[name] = buf
                context.set_tensor_address(name, alloc.data_ptr())
            if not context.execute_async_v3(stream.cuda_stream):
                raise BuildError(f"{plan_path}: profile {sp.name}: execution failed: " + "; ".join(logger.errors[-3:]))
        stream.synchronize()
        got = {n: t.float().cpu().numpy() for n, t in outputs.items()}
        try:
            want = _ort_run(Path(onnx_path), inputs)
        except Exception as e:  # e.g. bfloat16 graphs on ONNX Runtime's CPU EP
            why = f"onnxruntime could not compute the reference: {type(e).__name__}: {e}"
            record["profiles"][sp.name] = {"N": sp.N.opt, "lastSum": sp.lastSum.opt, "ok": None, "why": why,
                                           "finite": bool(all(np.isfinite(a).all() for a in got.values()))}
            log(f"[check] {sp.name}: ran, not compared ({why})")
            all_ok = None if all_ok is not False else False
            continue
        per_output = {}
        ok = True
        for name in output_names:
            a, b = got[name], want[name]
            if a.shape != b.shape:
                per_output[name] = {"ok": False, "why": f"shape {a.shape} vs onnxruntime {b.shape}"}
                ok = False
                continue
            diff = np.abs(a - b)
            close = bool(np.allclose(a, b, atol=tol.atol, rtol=tol.rtol)) and bool(np.isfinite(a).all())
            per_output[name] = {"ok": close, "max_abs": float(diff.max()) if diff.size else 0.0,
                                "mean_abs": float(diff.mean()) if diff.size else 0.0, "shape": list(a.shape)}
            ok &= close
        record["profiles"][sp.name] = {"N": sp.N.opt, "lastSum": sp.lastSum.opt, "ok": ok, "outputs": per_output}
        log(f"[check] {sp.name} (N={sp.N.opt}, lastSum={sp.lastSum.opt}): {'ok' if ok else 'MISMATCH'} "
            f"(max |diff| {max((o.get('max_abs', float('inf')) for o in per_output.values()), default=0.0):.3g})")
        if not ok:
            all_ok = False
    record["ok"] = all_ok          # True, False, or None where no reference could be computed
    return record
