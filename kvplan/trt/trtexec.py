"""The equivalent command line of the backend's CLI tool (trtexec / tensorrt_rtx) for a build."""
from __future__ import annotations

from pathlib import Path

from kvplan.profiles import Engine
from kvplan.trt.backend import Backend

TRTEXEC_HW_COMPAT = {"ampere_plus": "ampere+", "same_compute_capability": "sameComputeCapability"}


def shape_arg(shapes: dict[str, tuple], which: int) -> str:
    return ",".join(f"{name}:{'x'.join(str(d) for d in dims[which])}" for name, dims in shapes.items())


def trtexec_command(backend: Backend, onnx_path: Path, plan_path: Path, engine: Engine,
                    shapes: dict[str, dict[str, tuple]], timing_cache: Path | None) -> tuple[list[str], list[str]]:
    """The equivalent command line of the backend's CLI tool (trtexec / tensorrt_rtx), and notes."""
    argv = [backend.tool, f"--onnx={onnx_path}", f"--saveEngine={plan_path}"]
    notes = []
    if not backend.is_rtx and backend.strongly_typed_flag:
        argv.append("--stronglyTyped")     # TensorRT 10.x; TensorRT 11 is always strongly typed
    for i, per_input in enumerate(shapes.values()):
        # trtexec: each --profile=<i> opens a new optimization profile for the shape flags after it.
        argv += [f"--profile={i}", f"--minShapes={shape_arg(per_input, 0)}",
                 f"--optShapes={shape_arg(per_input, 1)}", f"--maxShapes={shape_arg(per_input, 2)}"]
    if engine.workspace_mib > 0:
        argv.append(f"--memPoolSize=workspace:{engine.workspace_mib}M")
    if backend.is_rtx:
        notes.append("tensorrt_rtx: networks are always strongly typed; no timing cache; builder optimization "
                     "level and compute capabilities are set through the API (flags not given here)")
    else:
        argv.append(f"--builderOptimizationLevel={engine.optimization_level}")
        if timing_cache is not None:
            argv.append(f"--timingCacheFile={timing_cache}")
        if engine.hardware_compatibility in TRTEXEC_HW_COMPAT:
            argv.append(f"--hardwareCompatibilityLevel={TRTEXEC_HW_COMPAT[engine.hardware_compatibility]}")
        if engine.version_compatible:
            argv.append("--versionCompatible")
        argv.append("--skipInference")
    return argv, notes
