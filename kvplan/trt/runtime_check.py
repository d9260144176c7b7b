"""Run a built plan on the GPU at every optimization profile's opt shapes and compare its outputs
with ONNX Runtime on the source ONNX (the half without a GPU: inputs and reference, testable anywhere).

torch is imported inside the functions that use it, the only function-local imports of the
engine stage: building and inspecting engines must work in a process without it (it costs
300 MB and a second to import, and bench.engine_memory measures the builder alone). torch
stages host tensors only: device memory and the stream come from the CUDA runtime through
Polygraphy's wrapper, so any torch build serves, the CPU one included.
"""
from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
from onnx import TensorProto
from polygraphy import cuda as pg_cuda
from polygraphy.datatype import DataType

from kvplan.lazy import lazy_import
from kvplan.profiles import Profile, Shapes
from kvplan.trt.backend import Backend
from kvplan.trt.callbacks import Log, Pending, make_logger
from kvplan.trt.errors import BuildError
from kvplan.trt.plan_io import deserialize, host_code_allowed
from kvplan.trt.shapes import shapes_for

ort = lazy_import("onnxruntime")


def _torch_dtype(trt, dt):
    import torch  # lazily: see the module docstring
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
             "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
    return table[dt.name]


def _check_inputs(contract: dict, sp: Shapes, shapes: dict[str, tuple], dtype: str, seed: int):
    """Inputs at the profile's opt shapes: causal mask, positions lastSum.., random hidden/past."""
    import torch  # lazily, as the export stage's helpers below: see the module docstring

    from kvplan.export.exporter import TORCH_DTYPES, causal_mask  # lazily, with torch

    tdtype = TORCH_DTYPES[dtype]
    n, last = sp.N.opt, sp.lastSum.opt
    g = torch.Generator().manual_seed(seed)
    inputs = {}
    for name, info in contract["inputs"].items():
        shape = shapes[name][1]
        if name == "attention_mask":        # an in-place buffer's mask is longer than lastSum + N
            inputs[name] = causal_mask(shape[0], n, last, tdtype, length=shape[3])
        elif name == "write_indices":
            inputs[name] = torch.full(shape, last, dtype=torch.int64)
        elif name == "position_ids":
            inputs[name] = torch.arange(last, last + n, dtype=torch.int64).expand(shape[0], n).contiguous()
        else:
            dt = TORCH_DTYPES.get(info["dtype"], tdtype)
            inputs[name] = torch.randn(shape, generator=g).to(dt)
    return inputs


def _ort_run(onnx_path: Path, inputs: dict) -> dict:
    """ONNX Runtime (CPU) outputs as float32 numpy arrays. numpy has no bfloat16, so bfloat16
    tensors travel as OrtValues over their int16 bits."""
    import torch  # lazily: see the module docstring

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


def aliased_input(engine, output: str, contract: dict, plan_path: Path) -> str | None:
    """The input an output shares memory with (kv_io = "inplace": past_key{i} <- past_key_in{i}).

    The engine's own answer, never a guess from the names: binding an output to an input the
    engine does not alias it with is undefined behaviour, and would hide a graph whose cache
    write did not become TensorRT's KV-cache update layer.
    """
    inplace = "write_indices" in contract["inputs"]
    get = getattr(engine, "get_aliased_input_tensor", None)
    if get is None:
        if inplace:
            raise BuildError(f"{plan_path}: this TensorRT has no ICudaEngine.get_aliased_input_tensor (TensorRT "
                             f"10.15 and later): the in-place outputs cannot be bound to their inputs")
        return None
    source = get(output) or None
    if source is None and inplace and re.fullmatch(r"past_(key|value)\d+", output):
        raise BuildError(f"{plan_path}: output {output} aliases no input: the engine has no KV-cache update layer "
                         f"for it, so it would not write the in-place buffer")
    return source


class _Device:
    """Device buffers and one stream through Polygraphy's CUDA runtime wrapper (libcudart via
    ctypes): works with any torch build, the CPU one included, which only stages host tensors."""

    def __init__(self):
        self.stream = pg_cuda.Stream()       # loads libcudart here, not at import
        self.buffers = []

    def upload(self, host):
        """A device copy of the (contiguous CPU torch) tensor ``host``."""
        buf = self.alloc(tuple(host.shape), host.dtype)
        buf.copy_from(host, self.stream)
        return buf

    def alloc(self, shape: tuple, dtype):
        # An empty tensor (lastSum = 0) still gets a valid address.
        buf = pg_cuda.DeviceArray(shape if math.prod(shape) else (1,), DataType.from_dtype(dtype))
        buf.logical_shape = shape      # the tensor's own shape, (…, 0, …) included
        self.buffers.append(buf)
        return buf

    def download(self, buf, dtype):
        import torch  # lazily: see the module docstring
        host = torch.empty(buf.logical_shape, dtype=dtype)
        if host.numel():
            buf.copy_to(host, self.stream)
        return host

    def free(self) -> None:
        for b in self.buffers:
            b.free()
        self.buffers = []
        self.stream.free()


def run_engine_check(plan_path: Path, profile: Profile, contract: dict, onnx_path: Path, backend: Backend,
                     log: Log = print) -> dict:
    """Run the plan at every profile's opt shapes on the GPU and compare with ONNX Runtime on ``onnx_path``.

    Without a runnable backend (no GPU, or a GPU the backend does not support) or without a
    loadable CUDA runtime, returns ``{"ran": False, "why": ...}``.
    """
    if not backend.can_run:
        return {"ran": False, "why": backend.why_not_run}
    try:
        device = _Device()
    except Exception as e:  # noqa: BLE001 - no libcudart, or the runtime refuses the device
        return {"ran": False, "why": f"no CUDA stream from the CUDA runtime: {type(e).__name__}: {e}"}
    try:
        return _run(plan_path, profile, contract, onnx_path, backend, device, log)
    finally:
        device.free()


def _run(plan_path, profile, contract, onnx_path, backend, device: _Device, log) -> dict:
    trt = backend.module
    pending = Pending()
    logger = make_logger(trt, log, pending)
    _runtime, engine = deserialize(trt, logger, Path(plan_path).read_bytes(),
                                   f"{plan_path}: could not deserialize the plan: ",
                                   host_code_allowed({"version_compatible": profile.engine.version_compatible}))
    context = engine.create_execution_context()
    if context is None:
        raise BuildError(f"{plan_path}: could not create an execution context: " + "; ".join(logger.errors[-3:]))
    stream = device.stream.ptr
    tol = profile.validate
    shapes = shapes_for(contract, profile)
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    input_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    output_names = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    aliases = {name: aliased_input(engine, name, contract, plan_path) for name in output_names}
    record: dict[str, Any] = {"ran": True, "plan": str(plan_path), "onnx": str(onnx_path),
                              "atol": tol.atol, "rtol": tol.rtol, "profiles": {}}
    all_ok = True
    for index, sp in enumerate(profile.shapes):
        inputs = _check_inputs(contract, sp, shapes[sp.name], profile.dtype, seed=index)
        if not context.set_optimization_profile_async(index, stream):
            raise BuildError(f"{plan_path}: could not select optimization profile {index} ({sp.name})")
        bound = {}
        for name in input_names:
            host = inputs[name].to(_torch_dtype(trt, engine.get_tensor_dtype(name))).contiguous()
            if not context.set_input_shape(name, tuple(host.shape)):
                raise BuildError(f"{plan_path}: profile {sp.name}: input {name} shape {tuple(host.shape)} refused")
            bound[name] = device.upload(host)
            context.set_tensor_address(name, bound[name].ptr)
        outputs = {}
        for name in output_names:
            dt = _torch_dtype(trt, engine.get_tensor_dtype(name))
            if aliases[name] is not None:
                # The KV-cache update layer writes into its cache input: the output is bound to
                # that input's own memory (the ORT reference reads the host copy).
                outputs[name] = (bound[aliases[name]], dt)
            else:
                outputs[name] = (device.alloc(tuple(context.get_tensor_shape(name)), dt), dt)
            context.set_tensor_address(name, outputs[name][0].ptr)
        if not context.execute_async_v3(stream):
            raise BuildError(f"{plan_path}: profile {sp.name}: execution failed: " + "; ".join(logger.errors[-3:]))
        got_t = {n: device.download(buf, dt) for n, (buf, dt) in outputs.items()}
        device.stream.synchronize()
        got = {n: t.float().numpy() for n, t in got_t.items()}
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
