"""Run a function in a forked child process and hand its result (or its exception) back.

The pipeline builds a group of stages this way so that each group's peak memory starts from
the small parent instead of sitting on what earlier stages' libraries and heaps left: torch,
once imported, cannot be unloaded, and glibc does not give back all of a freed heap.

The child is its own process group: a Ctrl-C reaches the parent alone, which passes it on once,
so the stage's own interrupt handling (temporary files removed, the manifest left unclaimed)
runs as it would in one process. The child dies with the parent (Linux), as it would have.
"""
from __future__ import annotations

import ctypes
import os
import pickle
import signal
import sys
import threading
import traceback
from typing import Callable, TypeVar

from kvplan.errors import ChildExitError, KvplanError

T = TypeVar("T")

# Libraries whose thread pools make a fork unsafe; where one is loaded the parent already holds
# its memory, so a child would not lower the peak either.
UNFORKABLE = ("torch", "onnxruntime", "tensorrt", "tensorrt_rtx", "tensorflow", "jax")

PR_SET_PDEATHSIG = 1

# What the parent passes on to the child rather than acting on itself.
FORWARDED = (signal.SIGINT, signal.SIGTERM)


def can_fork() -> bool:
    """Whether a forked child is safe here: Linux (macOS's system libraries are not fork-safe, and
    only Linux lets the child die with its parent), the main thread (the only one that may pass
    signals on), and none of UNFORKABLE loaded."""
    return (sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread()
            and not any(name in sys.modules for name in UNFORKABLE))


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError, TypeError):     # no prctl: the child may outlive a killed parent
        pass
    if os.getppid() != parent:                       # the parent died before prctl took effect
        os._exit(1)


def _child(fn: Callable[[], T], parent: int, out: int, mask: set) -> None:
    """Runs in the child: never returns, never runs the parent's cleanups (os._exit). ``mask`` is
    the signal mask to restore once the child's own handlers are in place."""
    code = 0
    try:
        os.setpgid(0, 0)
        _die_with_parent(parent)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)    # a signal held until now lands in here
            payload = ("ok", fn())
        except BaseException as e:  # noqa: BLE001  everything goes back to the parent
            payload = ("error", type(e).__name__, str(e), traceback.format_exc(), _pickled(e))
        data = pickle.dumps(payload)
        with os.fdopen(out, "wb") as f:
            f.write(data)
    except BaseException:  # noqa: BLE001  the pipe is gone or the result cannot be pickled
        traceback.print_exc()
        code = 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def _pickled(e: BaseException) -> bytes | None:
    try:
        data = pickle.dumps(e)
        pickle.loads(data)          # an exception class whose __init__ takes other arguments fails here
        return data
    except Exception:  # noqa: BLE001
        return None


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = " (the system may have run out of memory)" if sig == signal.SIGKILL else ""
        return f"was killed by signal {sig} ({signal.Signals(sig).name}){why}"
    return f"exited with status {os.WEXITSTATUS(status)} without a result"


def run_forked(fn: Callable[[], T], what: str) -> T:
    """fn() in a forked child; its return value (picklable) or its exception, raised here.

    ``what`` names the work in the error raised when the child ends without a result. An
    exception that cannot be pickled comes back as a KvplanError with its type and message; an
    unexpected one carries the child's traceback as a note."""
    for stream in (sys.stdout, sys.stderr):
        stream.flush()                  # else the child writes the parent's buffered lines again
    read, write = os.pipe()
    parent = os.getpid()
    # Ctrl-C and SIGTERM wait until the parent forwards them: one landing while the parent runs
    # its after-fork hooks would raise in a hook, where Python swallows it, and the child would
    # run on unasked (the race a loaded machine showed).
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, FORWARDED)
    try:
        pid = os.fork()
    except BaseException:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        raise
    if pid == 0:
        os.close(read)
        _child(fn, parent, write, mask)
    os.close(write)
    try:
        os.setpgid(pid, pid)            # also in the child: whichever runs first
    except OSError:                     # the child already did, or is gone
        pass
    interrupted = []

    def forward(signum, frame):
        interrupted.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)   # a signal held during the fork is forwarded now
        with os.fdopen(read, "rb") as f:
            data = f.read()
        _, status = os.waitpid(pid, 0)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if signal.SIGTERM in interrupted and not data:
        os.kill(os.getpid(), signal.SIGTERM)        # asked to end: end as without a child
    if not data:
        if signal.SIGINT in interrupted:
            raise KeyboardInterrupt
        raise ChildExitError(f"{what}: its process {_describe(status)}")
    kind, *rest = pickle.loads(data)
    if kind == "ok":
        return rest[0]
    name, message, trace, pickled = rest
    error = pickle.loads(pickled) if pickled else None
    if error is None:
        raise KvplanError(f"{what}: {name}: {message}")
    if not isinstance(error, (KvplanError, KeyboardInterrupt)):
        error.add_note(f"raised in {what}'s process:\n{trace.rstrip()}")
    raise error
