"""Plans on disk: atomic, durable writes (plans and timing caches) and deserialization."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import BuildError


def write_atomic(path: Path, data) -> int:
    """Write ``data`` (bytes or a buffer) to ``path`` via a same-directory temp file, fsync, rename.

    On any exception, KeyboardInterrupt included, the temp file is removed and ``path`` is untouched.
    Returns the number of bytes written.
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


def deserialize(trt, logger, plan_bytes, failure: str):
    """(runtime, engine) for a serialized plan; the runtime is returned to outlive the engine.

    Raises BuildError(``failure`` + the logger's last errors) when the runtime refuses the plan.
    """
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_bytes)
    if engine is None:
        raise BuildError(failure + "; ".join(logger.errors[-3:]))
    return runtime, engine
