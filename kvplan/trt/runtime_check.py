"""Run a built plan on the GPU at every optimization profile's opt shapes and compare its outputs
with ONNX Runtime on the source ONNX (the half without a GPU: inputs and reference, testable anywhere).

torch is imported inside the functions that use it, the only function-local imports of the
engine stage: building and inspecting engines must work in a process without it (it costs
300 MB and a second to import, and bench.engine_memory measures the builder alone).
"""
from __future__ import annotations

import ctypes
import math
import re
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import TensorProto

from kvplan.trt.backend import Backend
from kvplan.profiles import Profile, ShapeProfile
from kvplan.trt.callbacks import Log, Pending, make_logger
from kvplan.trt.errors import BuildError
from kvplan.trt.plan_io import deserialize
from kvplan.trt.shapes import shapes_for


def _torch_dtype(trt, dt):
    import torch  # lazily: see the module docstring
    table = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT64": torch.int64,
             "INT32": torch.int32, "BOOL": torch.bool, "INT8": torch.int8, "UINT8": torch.uint8}
    return table[dt.name]


def _check_inputs(contract: dict, sp: ShapeProfile, shapes: dict[str, tuple], dtype: str, seed: int):
    """Inputs at the profile's opt shapes: causal mask, positions lastSum.., random hidden/past."""
    import torch  # lazily, as the export stage's helpers below: see the module docstring
    from kvplan.export.exporter import TORCH_DTYPES, causal_mask

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


def _aliased_input(engine, output: str, contract: dict) -> str | None:
    """The input an output shares memory with (kv_io = "inplace": past_key{i} <- past_key_in{i})."""
    if hasattr(engine, "get_aliased_input_tensor"):
        name = engine.get_aliased_input_tensor(output)
        if name:
            return name
    match = re.fullmatch(r"past_(key|value)(\d+)", output)
    if "write_indices" in contract["inputs"] and match:
        return f"past_{match[1]}_in{match[2]}"
    return None


def run_engine_check(plan_path: Path, profile: Profile, contract: dict, onnx_path: Path, backend: Backend,
                     log: Log = print) -> dict:
    """Run the plan at every profile's opt shapes on the GPU and compare with ONNX Runtime on ``onnx_path``.

    Without a runnable backend (no GPU, or a GPU the backend does not support) returns
    ``{"ran": False, "why": ...}``.
    """
    if not backend.can_run:
        return {"ran": False, "why": backend.why_not_run}
    import torch  # lazily: see the module docstring

    trt = backend.module
    pending = Pending()
    logger = make_logger(trt, log, pending)
    _runtime, engine = deserialize(trt, logger, Path(plan_path).read_bytes(),
                                   f"{plan_path}: could not deserialize the plan: ")
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
                source = _aliased_input(engine, name, contract)
                if source is not None:
                    # The KV-cache update layer writes into its cache input: the output is bound
                    # to that input's own memory (the ORT reference reads the host copy).
                    outputs[name] = keep[input_names.index(source)]
                    context.set_tensor_address(name, outputs[name].data_ptr())
                    continue
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
