"""TensorRT backend selection: full TensorRT (``import tensorrt``) or TensorRT-RTX (``import tensorrt_rtx``).

Both share one Python API. The differences that matter to kvplan:

- Strongly typed networks: TensorRT 10.x needs ``NetworkDefinitionCreationFlag.STRONGLY_TYPED``;
  TensorRT 11 and TensorRT-RTX networks are always strongly typed (the flag may be missing
  or deprecated there, so it is looked up, never assumed).
- Running engines: needs a visible CUDA GPU, and for TensorRT-RTX one of its supported
  compute capabilities (7.5, 8.0, 8.6, 8.9, 12.x; not 9.0 Hopper). TensorRT-RTX builds and
  serializes engines on a CPU-only machine; it cannot deserialize them there. Full TensorRT's
  builder needs a GPU too.
- Versions: the ONNX parser of full TensorRT gained what kvplan's fused and in-place graphs
  use in 10.14 (Attention) and 10.15 (RMSNormalization, RotaryEmbedding, TensorScatter and the
  KV-cache update layer, ``get_aliased_input_tensor``); ``Backend.lacks`` names what an older
  one does not have.
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import warnings
from dataclasses import dataclass, field
from types import ModuleType

from kvplan.errors import BackendError

BACKENDS = ("tensorrt", "tensorrt-rtx")
MODULES = {"tensorrt": "tensorrt", "tensorrt-rtx": "tensorrt_rtx"}
# The distributions that install each module (PyPI / NVIDIA's index), newest CUDA first: their
# metadata gives the version without importing the bindings (0.1 s and 144 MiB), which a rebuild
# with nothing to do needs for its decision and nothing else.
DISTRIBUTIONS = {"tensorrt": ("tensorrt_cu13", "tensorrt_cu12", "tensorrt_cu11", "tensorrt"),
                 "tensorrt-rtx": ("tensorrt_rtx_cu13", "tensorrt_rtx_cu12", "tensorrt_rtx")}
# Compute capabilities TensorRT-RTX runs on (major, minor); any 12.x counts.
RTX_SUPPORTED_CC = ((7, 5), (8, 0), (8, 6), (8, 9))
RTX_SUPPORTED_MAJOR = (12,)

# What kvplan's graphs need of full TensorRT, and the release that added it. TensorRT-RTX has
# them all from the floor pyproject.toml sets (1.7, the release kvplan is tested with).
FEATURES = (
    ("Attention, the attention pass's fused layer (trt.LayerType.ATTENTION_INPUT)", (10, 14)),
    ("RMSNormalization, the rmsnorm pass's layer", (10, 15)),
    ("RotaryEmbedding, the rope pass's layer", (10, 15)),
    ("TensorScatter as the KV-cache update layer (kv_io = inplace)", (10, 15)),
    ("ICudaEngine.get_aliased_input_tensor, to bind in-place outputs (kv_io = inplace)", (10, 15)),
)

INSTALL_HINT = {
    "tensorrt-rtx": "install it with `pip install 'kvplan[tensorrt-rtx]'` (PyPI package tensorrt-rtx-cu13)",
    "tensorrt": ("full TensorRT comes from NVIDIA's package index (pip install tensorrt-cu13 where "
                 "pypi.nvidia.com is reachable, or `pip install 'kvplan[tensorrt]'` there); "
                 "on a machine without it use --backend tensorrt-rtx "
                 "(`pip install 'kvplan[tensorrt-rtx]'`)"),
}


@dataclass
class Backend:
    name: str                      # "tensorrt" | "tensorrt-rtx"
    version: str
    can_run: bool                  # engines can be deserialized and executed here
    why_not_run: str               # "" when can_run
    gpus: tuple[str, ...] = ()     # compute capabilities seen ("8.6", ...)
    lacks: tuple[str, ...] = ()    # FEATURES this version does not have
    can_build: bool = True         # full TensorRT's builder needs a CUDA GPU; TensorRT-RTX's does not
    loaded: ModuleType | None = field(default=None, repr=False)   # the trt module, once imported

    @property
    def module(self) -> ModuleType:
        """The trt module, imported on first use (a stage that builds or runs engines)."""
        if self.loaded is None:
            self.loaded = _import(self.name)
        return self.loaded

    @property
    def strongly_typed_flag(self) -> int:
        """Flags value for Builder.create_network."""
        return _strongly_typed_flag(self.module)

    @property
    def is_rtx(self) -> bool:
        return self.name == "tensorrt-rtx"

    @property
    def tool(self) -> str:
        """The command-line builder/benchmark tool of this backend."""
        return "tensorrt_rtx" if self.is_rtx else "trtexec"

    def describe(self) -> str:
        run = "can run engines" if self.can_run else f"cannot run engines ({self.why_not_run})"
        lacks = f"; lacks {'; '.join(self.lacks)}" if self.lacks else ""
        return f"{self.name} {self.version}: {run}{lacks}"


def version_tuple(version: str) -> tuple[int, ...]:
    """"10.13.0.35" -> (10, 13, 0, 35), "11.0.0b1" -> (11, 0, 0); "unknown" -> ()."""
    m = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(x) for x in m.group(0).split(".")) if m else ()


def lacking(name: str, version: str) -> tuple[str, ...]:
    """The FEATURES a backend of this version lacks (full TensorRT only: see FEATURES)."""
    if name != "tensorrt":
        return ()
    have = version_tuple(version)
    if not have:
        return ()      # an unparsable version is not guessed at
    return tuple(f"{what} (TensorRT {since[0]}.{since[1]})" for what, since in FEATURES if have[:2] < since)


def _import(name: str) -> ModuleType:
    modname = MODULES[name]
    try:
        return importlib.import_module(modname)
    except ImportError as e:
        raise BackendError(f"TensorRT backend {name!r} is not importable (import {modname}: {e}); "
                           f"{INSTALL_HINT[name]}") from None


def _probe(name: str) -> str:
    """The installed version of backend ``name``, found without importing it where its
    distribution's metadata says; BackendError when the module is not installed."""
    modname = MODULES[name]
    try:
        found = importlib.util.find_spec(modname) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise BackendError(f"TensorRT backend {name!r} is not importable (no module named {modname!r}); "
                           f"{INSTALL_HINT[name]}")
    for dist in DISTRIBUTIONS[name]:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    # Installed some other way (a system package, a local build): the module says.
    return str(getattr(_import(name), "__version__", "unknown"))


def _strongly_typed_flag(trt: ModuleType) -> int:
    flags = getattr(trt, "NetworkDefinitionCreationFlag", None)
    member = getattr(flags, "STRONGLY_TYPED", None) if flags is not None else None
    if member is None:
        return 0        # always strongly typed (TensorRT 11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # deprecated where it is the default
        return 1 << int(member)


def visible_gpus() -> tuple[list[str], str]:
    """Compute capabilities of the visible CUDA GPUs, and how they were found (or why none)."""
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "--query-gpu=compute_cap", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20)
            caps = [line.strip() for line in out.stdout.splitlines() if line.strip()]
            if out.returncode == 0 and caps:
                return caps, "nvidia-smi"
        except (OSError, subprocess.SubprocessError):
            pass
    try:  # cuda-python, where installed
        # Optional package, imported only here: most hosts do not have it.
        from cuda.bindings import runtime as cudart  # type: ignore
        err, count = cudart.cudaGetDeviceCount()
        if int(err) == 0 and count > 0:
            caps = []
            for i in range(count):
                err, prop = cudart.cudaGetDeviceProperties(i)
                if int(err) == 0:
                    caps.append(f"{prop.major}.{prop.minor}")
            if caps:
                return caps, "cuda-python"
    except Exception:
        pass
    caps = _driver_capabilities()
    if caps:
        return caps, "CUDA driver API"
    return [], "no CUDA GPU visible"


def _driver_capabilities() -> list[str]:
    """Compute capabilities from the CUDA driver library itself: no nvidia-smi or cuda-python
    needed, and unlike asking torch, no 300 MB import to find out there is no GPU."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return []
    count, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    caps = []
    for i in range(count.value):
        device = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(device), i) != 0:
            continue
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR / _MINOR
        if cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device) == 0 and \
                cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device) == 0:
            caps.append(f"{major.value}.{minor.value}")
    return caps


def rtx_supports(cc: str) -> bool:
    major, _, minor = cc.partition(".")
    try:
        m, n = int(major), int(minor or 0)
    except ValueError:
        return False
    return (m, n) in RTX_SUPPORTED_CC or m in RTX_SUPPORTED_MAJOR


def _runability(name: str, gpus: tuple[list[str], str] | None = None) -> tuple[bool, str, tuple[str, ...]]:
    caps, how = gpus if gpus is not None else visible_gpus()
    if not caps:
        return False, how, ()
    if name == "tensorrt-rtx":
        ok = [c for c in caps if rtx_supports(c)]
        if not ok:
            return False, (f"TensorRT-RTX does not support the visible GPU(s) (compute capability "
                           f"{', '.join(caps)}; supported: 7.5, 8.0, 8.6, 8.9, 12.x — not 9.0 Hopper)"), tuple(caps)
    return True, "", tuple(caps)


def select_backend(name: str = "auto") -> Backend:
    """A named backend must import. ``auto`` takes, of the importable ones, one whose builder can
    run here (full TensorRT's needs a GPU), then one that lacks none of FEATURES, then one that
    can run engines here, then full TensorRT."""
    if name not in ("auto", *BACKENDS):
        raise BackendError(f"unknown TensorRT backend {name!r} (one of auto, {', '.join(BACKENDS)})")
    gpus = visible_gpus()
    if name != "auto":
        return _make(name, _probe(name), gpus)
    made, errors = [], []
    for candidate in BACKENDS:
        try:
            made.append(_make(candidate, _probe(candidate), gpus))
        except BackendError as e:
            errors.append(str(e))
    if not made:
        raise BackendError("no TensorRT backend is importable: " + "; ".join(errors))
    best = max(made, key=lambda b: (b.can_build, not b.lacks, b.can_run, not b.is_rtx))
    if not best.can_build:
        raise BackendError(f"{best.name} {best.version} is installed but its builder needs a CUDA GPU "
                           f"({best.why_not_run}); to build on this machine, {INSTALL_HINT['tensorrt-rtx']}")
    return best


def _make(name: str, version: str, gpus: tuple[list[str], str] | None = None) -> Backend:
    can_run, why, caps = _runability(name, gpus)
    return Backend(name=name, version=version, can_run=can_run, why_not_run=why, gpus=caps,
                   lacks=lacking(name, version), can_build=name == "tensorrt-rtx" or bool(caps))
