"""Deserializing plans (their atomic writes are kvplan.fileio.atomic_file)."""
from __future__ import annotations

from kvplan.trt.errors import BuildError


def host_code_allowed(options: dict | None) -> bool:
    """Whether a plan built with these build options (a build record's "options") embeds host code
    the runtime must be allowed to run: TensorRT's version-compatible plans carry their lean runtime."""
    return bool((options or {}).get("version_compatible"))


def deserialize(trt, logger, plan_bytes, failure: str, host_code: bool = False):
    """(runtime, engine) for a serialized plan; the runtime is returned to outlive the engine.

    ``host_code``: the plan is version compatible (see host_code_allowed); without
    ``engine_host_code_allowed`` the runtime refuses such plans. It stays off otherwise: the
    host code in a plan runs in this process.

    Raises BuildError(``failure`` + the logger's last errors) when the runtime refuses the plan.
    """
    runtime = trt.Runtime(logger)
    if host_code and hasattr(runtime, "engine_host_code_allowed"):
        runtime.engine_host_code_allowed = True
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise BuildError(failure + "; ".join(logger.errors[-3:]))
    return runtime, engine
