"""Memory figures of a build: the ONNX weights, the builder's logged estimates, and (where the
plan can be deserialized here) the engine's own device-memory and weight sizes."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from onnx import helper

from kvplan.lazy import lazy_import
from kvplan.trt.backend import Backend
from kvplan.trt.plan_io import deserialize

onnx = lazy_import("onnx")

# Memory lines the builder logs (INFO) once per optimization profile, then weights once.
_MEMORY_LINE = re.compile(r"^(Total Host Persistent Memory|Total Device Persistent Memory|Max Scratch Memory|"
                          r"Total Activation Memory|Total Weights Memory): (\d+) bytes")


def onnx_weight_bytes(onnx_path: Path) -> int:
    """Bytes of the graph's initializers and Constant tensors (external data is not read)."""
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


def memory_from_log(messages: list[tuple[str, str]], profile_names: list[str]) -> dict | None:
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


def engine_memory(trt, plan_bytes, logger, n_profiles: int, host_code: bool = False) -> dict:
    _runtime, engine = deserialize(trt, logger, plan_bytes,
                                   "the runtime could not deserialize the plan it just built: ", host_code)
    out: dict[str, Any] = {}
    size = getattr(engine, "device_memory_size_v2", None)
    if size is None:
        size = getattr(engine, "device_memory_size", None)
    out["device_memory_size"] = int(size) if size is not None else None
    get = getattr(engine, "get_device_memory_size_for_profile_v2", None) or \
        getattr(engine, "get_device_memory_size_for_profile", None)
    out["device_memory_size_per_profile"] = [int(get(i)) for i in range(n_profiles)] if get else None
    stat = getattr(getattr(trt, "EngineStat", None), "TOTAL_WEIGHTS_SIZE", None)
    readable = stat is not None and hasattr(engine, "get_engine_stat")
    out["engine_weights_bytes"] = int(engine.get_engine_stat(stat)) if readable else None
    return out


def memory_record(trt, backend: Backend, onnx_path: Path, plan_path: Path, logger, profile_names: list[str],
                  host_code: bool = False) -> dict:
    """The build record's "memory": ONNX weights, the builder's log figures and, where the backend
    can deserialize here, the engine's; every figure it cannot get is null with the reason.
    ``host_code``: the plan is version compatible (plan_io.host_code_allowed)."""
    memory: dict[str, Any] = {"weights_bytes_onnx": onnx_weight_bytes(onnx_path),
                              "builder_reported": memory_from_log(logger.messages, profile_names)}
    if memory["builder_reported"] is None:
        memory["builder_reported_why"] = "the builder logged no memory figures"
    if backend.can_run:
        try:
            memory.update(engine_memory(trt, Path(plan_path).read_bytes(), logger, len(profile_names), host_code))
        except Exception as e:  # the plan is built; the figures are a bonus
            memory.update(device_memory_size=None, device_memory_size_per_profile=None,
                          engine_memory_why=f"deserialization failed: {e}")
    else:
        memory.update(device_memory_size=None, device_memory_size_per_profile=None, engine_weights_bytes=None,
                      engine_memory_why=f"needs a deserialized engine; {backend.why_not_run}")
    return memory
