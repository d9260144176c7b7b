"""Stages run in order over one target directory, each skipped when its inputs are unchanged.

A stage's inputs are everything that determines its outputs: the upstream
artifacts' hashes, the profile fields it reads, kvplan's source for that stage and
the library versions. When they hash the same as in the manifest and the recorded
artifacts are intact on disk, the stage is reported up to date and not run.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import gc
import os
import resource
import time
from pathlib import Path
from typing import Protocol

from kvplan.forked import can_fork, run_forked
from kvplan.manifest import MANIFEST, SCHEMA, artifacts_intact, digest, load_manifest, now, write_json_atomic


class Stage(Protocol):
    """What Pipeline.run needs of a stage; each stage module's class (kvplan.export.stage, ...) has it."""
    name: str

    def inputs(self, done: dict[str, dict]) -> dict:
        """What the outputs depend on, given the records of the stages before it (upstream hashes)."""

    def build(self, done: dict[str, dict]) -> dict:
        """Build the outputs; returns the stage's record: {"artifacts": [...], ...}."""


def graph_artifacts(record: dict) -> list[dict]:
    """A stage's ONNX graphs, pack by pack (the quantize stage also records its weights file)."""
    return [a for a in record["artifacts"] if "pack" in a]


def remove_artifacts(target: Path, entries: list[dict]) -> None:
    for entry in entries:
        for e in (entry, entry.get("external_data")):
            if e:
                (target / e["path"]).unlink(missing_ok=True)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mib() -> float | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def release_memory() -> None:
    """Hand memory a finished stage freed back to the OS before the next stage allocates its own.

    glibc keeps freed heap pages in its arenas; the export's hundreds of MB of weight copies
    would otherwise stay resident under the engine build's own peak.
    """
    gc.collect()
    trim_heap()


def _libc():
    try:
        return ctypes.CDLL(None)
    except (OSError, TypeError):       # no C library to open by name (not a POSIX system)
        return None


_LIBC = _libc()


def trim_heap() -> None:
    """Only the glibc trim, no garbage collection (about 0.2 s with torch loaded): for freeing
    done by reference counts, as between validation points, and by the engine builder."""
    try:
        _LIBC.malloc_trim(0)
    except AttributeError:      # not glibc (or no C library found): nothing to trim
        pass


M_MMAP_THRESHOLD = -3           # glibc's mallopt parameter


def map_large_allocations(threshold: int = 4 << 20) -> None:
    """Have glibc serve every allocation above ``threshold`` bytes by its own mmap, unmapped when freed.

    glibc's default threshold adapts: after a large block is freed it rises to that block's size
    (up to 32 MiB), and blocks below it then come from the heap, where freed ones stay resident
    until a trim and fragment it. A fixed threshold keeps large tensors out of the heap. No-op
    where the C library is not glibc."""
    try:
        _LIBC.mallopt(M_MMAP_THRESHOLD, threshold)
    except AttributeError:
        pass


@contextlib.contextmanager
def collections_skip_what_exists():
    """Garbage collections inside skip every object that exists on entry: the libraries' own
    millions (torch, transformers, ONNX) made a full collection cost 0.4 s, and validation
    collects after every runner of every layer range. Objects made inside are collected as
    usual; the ones from before are tracked again on exit."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def stage_groups(stages: list) -> list[list]:
    """Stages split before each one that asks for a process of its own (``own_process``)."""
    groups: list[list] = []
    for stage in stages:
        if not groups or getattr(stage, "own_process", False):
            groups.append([])
        groups[-1].append(stage)
    return groups


class Pipeline:
    """Runs stages in order; with ``fork``, each group of stages (stage_groups) that has one to
    build runs in a forked child (kvplan.forked) where that is safe, so that the engine builder's
    peak does not sit on the export's torch and heap. Up-to-date checks stay in this process: a
    no-op run forks nothing."""

    def __init__(self, target: Path, header: dict, log=print, fork: bool = False):
        self.target, self.header, self.log, self.fork = target, header, log, fork

    def _write(self, status: str, stages: dict[str, dict]) -> None:
        write_json_atomic(self.target / MANIFEST, {
            "schema": SCHEMA, "status": status, "updated": now(), **self.header, "stages": stages})

    def _needs_build(self, stage: Stage, old: dict, done: dict, force: bool) -> dict | None:
        """The stage's inputs where it must be built; None (and its old record in done) where not."""
        inputs = stage.inputs(done)
        prev = old.get(stage.name)
        if (not force and prev and prev.get("inputs_digest") == digest(inputs)
                and artifacts_intact(self.target, prev.get("artifacts", []), refresh=True)):
            self.log(f"[{stage.name}] up to date ({len(prev.get('artifacts', []))} artifact(s), inputs unchanged)")
            done[stage.name] = prev
            return None
        return inputs

    def run(self, stages: list[Stage], force: bool = False) -> dict:
        old = (load_manifest(self.target) or {}).get("stages", {})
        done: dict[str, dict] = {}
        rebuilt: list[str] = []
        last = stages[-1] if stages else None
        for group in stage_groups(stages):
            todo = list(group)
            inputs = None
            while todo and (inputs := self._needs_build(todo[0], old, done, force)) is None:
                todo.pop(0)
            if not todo:
                continue
            build = functools.partial(self._build, todo, inputs, old, dict(done), force, last)
            if self.fork and can_fork():
                what = f"stage {todo[0].name!r}" if len(todo) == 1 else f"stages {todo[0].name!r}..{todo[-1].name!r}"
                made, names = run_forked(functools.partial(build, "child"), what)
            else:
                made, names = build("main")
            done.update(made)
            rebuilt += names
        self._write("complete", done)
        if not rebuilt:
            self.log("nothing to do: every stage is up to date (use --force to rebuild)")
        return {"stages": done, "rebuilt": rebuilt}

    def _build(self, stages: list[Stage], inputs: dict, old: dict, done: dict, force: bool, last, process: str
               ) -> tuple[dict[str, dict], list[str]]:
        """Build stages[0] (from ``inputs``) and, in order, every later one whose inputs then
        changed; returns the records of the stages settled here (built or up to date) and the
        names of those built."""
        settled: dict[str, dict] = {}
        rebuilt = []
        for i, stage in enumerate(stages):
            if i and (inputs := self._needs_build(stage, old, done, force)) is None:
                settled[stage.name] = done[stage.name]
                continue
            prev = old.get(stage.name)
            # From here on the old record of this stage (and everything after it) no
            # longer describes what is on disk: drop it before touching any file.
            self._write("building", dict(done))
            # The old files go too: a rebuild that fails must not leave last time's
            # plan beside a manifest that no longer vouches for it.
            if prev:
                remove_artifacts(self.target, prev.get("artifacts", []))
            self.log(f"[{stage.name}] building")
            t0 = time.perf_counter()
            record = stage.build(done)
            record.update(inputs_digest=digest(inputs), inputs=inputs, seconds=round(time.perf_counter() - t0, 3),
                          process_peak_rss_mib=round(peak_rss_mib(), 1), process=process, finished=now())
            if stage is not last and not (process == "child" and stage is stages[-1]):
                # The next stage's peak sits on top of what this one left (with torch loaded a
                # collection takes 0.1-0.2 s, so not after the last: validation collects for
                # itself; nor where the process ends with the stage).
                release_memory()
            done[stage.name] = settled[stage.name] = record
            rebuilt.append(stage.name)
            self._write("incomplete", dict(done))
            rss = rss_mib()
            self.log(f"[{stage.name}] done in {record['seconds']:.1f} s"
                     + (f" (process RSS now {rss:.0f} MiB, peak {record['process_peak_rss_mib']:.0f} MiB)" if rss else ""))
        return settled, rebuilt
