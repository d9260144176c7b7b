"""Wall time and peak resident memory of each validation phase.

The CPU time the process spent in each phase (all its threads) is recorded beside the wall
time: on a shared machine the wall time depends on what else runs, the CPU time much less.

Linux keeps a process's peak RSS (VmHWM) and lets the process reset it
(``/proc/self/clear_refs`` with "5"), so each phase's own peak is read exactly,
not sampled. Elsewhere, and where the reset has no effect, the phases report time only.
"""
from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", _STATUS.read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def rss_bytes() -> int | None:
    kib = _status_kib("VmRSS")
    return None if kib is None else kib << 10


def peak_bytes() -> int | None:
    kib = _status_kib("VmHWM")
    return None if kib is None else kib << 10


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses or ignores the request.

    Some sandboxed kernels accept the write and change nothing: the peak read after it would be
    the whole process's, so a reset that did not bring VmHWM down to about VmRSS counts as none.
    """
    try:
        _CLEAR.write_text("5")
    except OSError:
        return False
    peak, rss = peak_bytes(), rss_bytes()
    return peak is not None and rss is not None and peak - rss < 4 << 20


@dataclass
class Phase:
    name: str
    seconds: float
    peak: int | None        # bytes; None where the OS does not say
    cpu_seconds: float = 0.0

    def to_dict(self) -> dict:
        return {"name": self.name, "seconds": round(self.seconds, 2), "cpu_seconds": round(self.cpu_seconds, 2),
                "peak_rss_mib": None if self.peak is None else round(self.peak / 2**20, 1)}


class _Kept:
    """What a phase's block may say of it: ``discard()`` when nothing ran after all."""
    keep = True

    def discard(self) -> None:
        self.keep = False


class Meter:
    """Phases in the order they ran; a phase's name may repeat (one per pack, say) and is summed in ``merged``."""

    def __init__(self, log=None):
        self.log = log
        self.phases: list[Phase] = []
        self._peak_before = peak_bytes()     # imports and whatever ran before validation

    @contextlib.contextmanager
    def phase(self, name: str):
        before = peak_bytes()
        resettable = _reset_peak()
        start_rss = rss_bytes()
        if before is not None:
            self._peak_before = max(self._peak_before or 0, before)
        t, cpu = time.perf_counter(), time.process_time()
        kept = _Kept()
        try:
            yield kept
        finally:
            peak = peak_bytes() if resettable else None
            if not kept.keep:                # its memory still counts in the process's peak
                self._peak_before = max(self._peak_before or 0, peak or 0) or None
            else:
                self.phases.append(Phase(name, time.perf_counter() - t, peak, time.process_time() - cpu))
                if self.log:                 # as it ends: a run stopped later still tells where its time and memory went
                    self.log(f"[validate] phase {name}: {self.phases[-1].seconds:.1f} s "
                             f"(CPU {self.phases[-1].cpu_seconds:.1f} s)"
                             + ("" if peak is None else f", peak RSS {peak / 2**20:.0f} MiB")
                             + ("" if start_rss is None else f" (RSS {start_rss / 2**20:.0f} MiB at its start)"))

    @property
    def peak(self) -> int | None:
        """Peak RSS of the whole process so far (before and during every phase)."""
        now = peak_bytes()
        known = [p.peak for p in self.phases if p.peak is not None] + [x for x in (self._peak_before, now) if x]
        return max(known) if known else None

    def merged(self) -> list[Phase]:
        """One row per phase name, in first-seen order: total time, highest peak."""
        out: dict[str, Phase] = {}
        for p in self.phases:
            if p.name not in out:
                out[p.name] = Phase(p.name, 0.0, None)
            m = out[p.name]
            m.seconds += p.seconds
            m.cpu_seconds += p.cpu_seconds
            if p.peak is not None:
                m.peak = max(m.peak or 0, p.peak)
        return list(out.values())
