"""Deserializing plans (their atomic writes are build.manifest.write_atomic)."""
from __future__ import annotations

from kvplan.trt.errors import BuildError


def deserialize(trt, logger, plan_bytes, failure: str):
    """(runtime, engine) for a serialized plan; the runtime is returned to outlive the engine.

    Raises BuildError(``failure`` + the logger's last errors) when the runtime refuses the plan.
    """
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise BuildError(failure + "; ".join(logger.errors[-3:]))
    return runtime, engine
