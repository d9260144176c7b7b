"""Runners driven one after the other over the points, each point compared and saved as it comes.

Memory is what one runner needs for one point: only the running runner is active (an ONNX
Runtime session holds its own copy of the weights, so two alive at once would hold two; each
runner runs every optimization profile's points in one activation, and the reference model
can be freed once its pass is done),
each point's feed is built when it is fed and dropped after, and each output is written to
the Polygraphy JSON file, compared with the earlier runners' outputs of the same point and
dropped. Earlier runners' outputs wait on disk (a private spill directory, removed at the
end) and are read back memory-mapped, one tensor at a time.
"""
from __future__ import annotations

import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kvplan.fileio import naming_write_errors, temp_prefix
from kvplan.pipeline import trim_heap
from kvplan.validate import polyjson
from kvplan.validate.compare import compare_point
from kvplan.validate.points import as_float32


def _spill(directory: Path, outputs) -> dict[str, Path]:
    directory.mkdir(parents=True)
    files = {}
    for j, (name, value) in enumerate(outputs.items()):
        # numpy keeps its dtype; bfloat16 (a torch tensor) is widened to float32, exactly.
        array = value if isinstance(value, np.ndarray) else as_float32(value)
        files[name] = directory / f"{j}.npy"
        with naming_write_errors(files[name]):      # numpy's short-write error names no file
            np.save(files[name], array, allow_pickle=False)
    return files


class _Spilled(dict):
    """An earlier runner's outputs of one point, each tensor mapped from its file when asked for."""

    def __getitem__(self, name):
        return np.load(super().__getitem__(name), mmap_mode="r", allow_pickle=False)


@dataclass(frozen=True)
class Measure:
    """A figure reported of two runners' ``output`` for each point, not compared against a
    tolerance: ``fn(earlier's, later's)`` as the later runner produces it (the earlier's
    spilled, that output only, where no pair keeps it already)."""
    earlier: str
    later: str
    output: str
    fn: Callable


@dataclass
class Job:
    """One (range of a pack, optimization profile) group of points. ``base`` names the pack's files,
    ``vdir/<base>.*.json``: a pack validated in layer ranges has one job per range and profile,
    all with the pack's base, and its files are assembled when the last range has run."""
    pack: int
    base: str
    group: list
    feed_of: Callable                     # (point data, runner name) -> the range's feed
    segment: int = 0                      # which range of the pack
    ranges: int = 1                       # how many the pack has
    next_layer: int | None = None         # the layer after this range, when the stack goes on
    pack_outputs: list[str] | None = None # cut packs: the pack's output names, in its order
    pack_feed: Callable | None = None     # cut packs: (point data) -> the pack's whole feed

    @property
    def last(self) -> bool:
        """Whether this range ends the pack (its hidden_out is the pack's)."""
        return self.segment == self.ranges - 1


class Streamer:
    """Runs runners one at a time, each over its jobs, comparing every (earlier, later) pair of ``pairs``
    on every output of every point as the later runner produces it.

    Writes ``<base>.inputs.json`` (with the first runner that runs a job) and
    ``<base>.outputs.<runner>.json``. A runner whose activation fails is recorded in ``not_run``
    with ``why_not(runner, error)`` (None: re-raise). A range's hidden_out is handed on in the
    point data (``leaving``) when a range follows; it is compared only where it is the pack's.
    """

    def __init__(self, vdir: Path, pairs, tol, meter, not_run: dict, log, why_not=None, measures=()):
        self.vdir, self.pairs, self.tol, self.meter = vdir, pairs, tol, meter
        self.measures = list(measures)
        self.measured: dict[tuple[str, str, str], float] = {}        # (base, later runner, point label) -> figure
        self.not_run, self.log, self.why_not = not_run, log, why_not
        # Marked as a build's temporary: the next build removes what a killed validation left.
        self._spill = tempfile.TemporaryDirectory(prefix=temp_prefix(Path("spill")), dir=vdir)
        self.spill_root = Path(self._spill.name)
        # (base, runner) -> per point, {output name: its file}, filled range by range
        self.spilled: dict[tuple[str, str], list[dict[str, Path]]] = {}
        self.times: dict[tuple[str, str], list[float]] = {}
        self.rows: list = []
        self.ran: dict[str, list[str]] = {}                         # base -> runners that ran, in order
        self.written: dict[str, list[Path]] = {}                    # base -> files, inputs first

    def close(self) -> None:
        self._spill.cleanup()

    def run(self, runner, jobs: list[Job], later: set[str]) -> bool:
        """Run ``runner`` over ``jobs``; ``later``: runners still to come (whose pairs need its outputs)."""
        keep = any(a == runner.name and b in later for a, b in self.pairs)
        # The phase includes the activation: creating an ONNX Runtime session is part of its runner's cost.
        with self.meter.phase(runner.name) as phase:
            try:
                runner.activate()
            except Exception as e:
                why = self.why_not(runner, e) if self.why_not else None
                if why is None:
                    raise
                phase.discard()
                self.not_run.setdefault(runner.name, why)
                self.log(f"[validate]   {runner.name}: not run ({why})")
                return False
            try:
                for job in jobs:
                    self._job(runner, job, keep or job.ranges > 1)
            finally:
                runner.deactivate()
        return True

    def _job(self, runner, job: Job, keep: bool) -> None:
        base, whole = job.base, job.ranges == 1
        against = [a for a, b in self.pairs if b == runner.name and (base, a) in self.spilled]
        measures = [m for m in self.measures if m.later == runner.name and (base, m.earlier) in self.spilled]
        # Outputs a measure needs of this runner, where nothing else spills them.
        kept_for = {m.output for m in self.measures if m.earlier == runner.name} if not keep and job.last else set()
        writer = inputs = None
        if whole:
            out_path = self.vdir / f"{base}.outputs.{runner.name}.json"
            writer = polyjson.outputs_writer(out_path, runner.name)
            inputs = polyjson.inputs_writer(self.vdir / f"{base}.inputs.json") if base not in self.ran else None
        spilled = self.spilled.setdefault((base, runner.name), []) if keep or kept_for else None
        times = self.times.setdefault((base, runner.name), []) if not whole else None
        try:
            for k, data in enumerate(job.group):
                feed = job.feed_of(data, runner.name)
                if inputs:
                    inputs.append(feed)
                outputs = runner.infer(feed)
                del feed
                if writer:
                    writer.append(polyjson.iteration(outputs, runner.name, runner.last_inference_time()))
                if job.next_layer is not None:
                    data.leaving[(runner.name, job.next_layer)] = outputs["hidden_out"]
                compared = outputs if job.last else {n: v for n, v in outputs.items() if n != "hidden_out"}
                for a in against:
                    have = self.spilled[(base, a)][k]
                    want = _Spilled((n, have[n]) for n in compared if n in have)
                    self.rows += compare_point(want, compared, data.point, job.pack, f"{a} vs {runner.name}",
                                               self.tol.atol, self.tol.rtol)
                if job.last:
                    for m in measures:
                        have = self.spilled[(base, m.earlier)][k]
                        if m.output in have and m.output in outputs:
                            self.measured[(base, runner.name, data.point.label)] = m.fn(
                                _Spilled(have)[m.output], outputs[m.output])
                if keep or kept_for:
                    files = _spill(self.spill_root / base / runner.name / f"{job.segment}.{k}",
                                   compared if keep else {n: compared[n] for n in kept_for if n in compared})
                    if job.segment == 0:
                        spilled.append(files)
                    else:
                        spilled[k].update(files)
                if times is not None:
                    if job.segment == 0:
                        times.append(0.0)
                    times[k] += runner.last_inference_time() or 0.0
                del outputs, compared
                # glibc keeps the point's freed buffers (ONNX Runtime's intermediates above all) in its
                # heap; the next point would then peak on top of them (about 250 MiB more at the default
                # model's N = 512, lastSum = 3584 point). The outputs went with their last
                # reference, so a trim suffices (a garbage collection per point costs 0.2 s).
                trim_heap()
        except BaseException:
            for w in (writer, inputs):
                if w:
                    w.abort()
            raise
        if whole:
            writer.close()
            if inputs:
                inputs.close()
            self._record(base, runner.name, ([inputs.path] if inputs else []) + [out_path])
        elif job.last:
            self._assemble(runner.name, job)

    def _record(self, base: str, name: str, paths: list[Path]) -> None:
        """``name`` ran every point of ``base`` and wrote ``paths`` (its inputs file first, if it wrote it)."""
        self.written.setdefault(base, []).extend(paths)
        self.ran.setdefault(base, []).append(name)

    def _assemble(self, name: str, job: Job) -> None:
        """A cut pack's files, once its last range has run: its whole feed and its outputs, point by
        point, in the pack's output order, from the ranges' spilled outputs."""
        base = job.base
        paths = []
        if base not in self.ran:
            inputs = polyjson.inputs_writer(self.vdir / f"{base}.inputs.json")
            try:
                for data in job.group:
                    inputs.append(job.pack_feed(data))
                    trim_heap()
            except BaseException:
                inputs.abort()
                raise
            inputs.close()
            paths.append(inputs.path)
        out_path = self.vdir / f"{base}.outputs.{name}.json"
        writer = polyjson.outputs_writer(out_path, name)
        try:
            for files, runtime in zip(self.spilled[(base, name)], self.times[(base, name)]):
                outputs = OrderedDict((n, np.asarray(np.load(files[n], mmap_mode="r", allow_pickle=False)))
                                      for n in job.pack_outputs)
                writer.append(polyjson.iteration(outputs, name, runtime))
                del outputs
        except BaseException:
            writer.abort()
            raise
        writer.close()
        self._record(base, name, paths + [out_path])
