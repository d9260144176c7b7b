"""TensorRT callbacks: the ILogger, the IProgressMonitor, and the exception they keep.

Callbacks run inside TensorRT (some on its threads) and must never raise: an exception
raised while logging is kept in a ``Pending``, cancels the build at the next step, and is
re-raised by build_engine. Ctrl-C is taken the same way (``interrupts_cancel``): Python's
default handler would raise KeyboardInterrupt wherever the interpreter next runs, and
inside a callback TensorRT's bindings print and swallow it, so the build ran on and
exited 0.
"""
from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Iterator

Log = Callable[[str], None]


class Pending:
    """An exception raised inside a TensorRT callback, kept to cancel the build and re-raise after."""

    def __init__(self):
        self.exc: BaseException | None = None

    def keep(self, exc: BaseException) -> None:
        if self.exc is None:
            self.exc = exc


@contextlib.contextmanager
def interrupts_cancel(pending: Pending) -> Iterator[None]:
    """While the builder runs, SIGINT only records a KeyboardInterrupt in ``pending``: the progress
    monitor then cancels the build, and build_engine raises it once the builder returns."""
    if threading.current_thread() is not threading.main_thread():
        yield                       # signal handlers can only be set from the main thread
        return

    def on_sigint(signum, frame):
        pending.keep(KeyboardInterrupt())

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def make_logger(trt, log: Log, pending: Pending):
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


def make_progress_monitor(trt, log: Log, pending: Pending, max_depth: int = 2, step_interval: float = 5.0):
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
