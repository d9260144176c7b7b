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
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kvplan.pipeline import trim_heap
from kvplan.validate import polyjson
from kvplan.validate.compare import compare_point
from kvplan.validate.points import as_float32


def _spill(directory: Path, outputs) -> list[str]:
    directory.mkdir(parents=True)
    names = []
    for j, (name, value) in enumerate(outputs.items()):
        # numpy keeps its dtype; bfloat16 (a torch tensor) is widened to float32, exactly.
        array = value if isinstance(value, np.ndarray) else as_float32(value)
        np.save(directory / f"{j}.npy", array, allow_pickle=False)
        names.append(name)
    return names


class _Spilled(dict):
    """An earlier runner's outputs of one point, each tensor mapped from its file when asked for."""

    def __init__(self, directory: Path, names: list[str]):
        super().__init__((name, j) for j, name in enumerate(names))
        self.directory = directory

    def __getitem__(self, name):
        return np.load(self.directory / f"{super().__getitem__(name)}.npy", mmap_mode="r", allow_pickle=False)


@dataclass
class Job:
    """One (pack, optimization profile) group of points, saved under ``vdir/<base>.*.json``."""
    pack: int
    base: str
    group: list
    feed_of: Callable


class Streamer:
    """Runs runners one at a time, each over its jobs, comparing every (earlier, later) pair of ``pairs``
    on every output of every point as the later runner produces it.

    Writes ``<base>.inputs.json`` (with the first runner that runs a job) and
    ``<base>.outputs.<runner>.json``. A runner whose activation fails is recorded in ``not_run``
    with ``why_not(runner, error)`` (None: re-raise).
    """

    def __init__(self, vdir: Path, pairs, tol, meter, not_run: dict, log, why_not=None):
        self.vdir, self.pairs, self.tol, self.meter = vdir, pairs, tol, meter
        self.not_run, self.log, self.why_not = not_run, log, why_not
        self._spill = tempfile.TemporaryDirectory(prefix=".spill-", dir=vdir)
        self.spill_root = Path(self._spill.name)
        self.spilled: dict[tuple[str, str], list[list[str]]] = {}   # (base, runner) -> per point, output names
        self.rows: list = []
        self.ran: dict[str, list[str]] = {}                         # base -> runners that ran, in order
        self.written: dict[str, list[Path]] = {}                    # base -> files, inputs first

    def close(self) -> None:
        self._spill.cleanup()

    def run(self, runner, jobs: list[Job], later: set[str]) -> bool:
        """Run ``runner`` over ``jobs``; ``later``: runners still to come (whose pairs need its outputs)."""
        keep = any(a == runner.name and b in later for a, b in self.pairs)
        try:
            runner.activate()
        except Exception as e:
            why = self.why_not(runner, e) if self.why_not else None
            if why is None:
                raise
            self.not_run.setdefault(runner.name, why)
            self.log(f"[validate]   {runner.name}: not run ({why})")
            return False
        try:
            with self.meter.phase(runner.name):
                for job in jobs:
                    self._job(runner, job, keep)
        finally:
            runner.deactivate()
        return True

    def _job(self, runner, job: Job, keep: bool) -> None:
        base = job.base
        against = [a for a, b in self.pairs if b == runner.name and (base, a) in self.spilled]
        out_path = self.vdir / f"{base}.outputs.{runner.name}.json"
        writer = polyjson.outputs_writer(out_path, runner.name)
        inputs = polyjson.inputs_writer(self.vdir / f"{base}.inputs.json") if base not in self.ran else None
        try:
            for k, data in enumerate(job.group):
                feed = job.feed_of(data)
                if inputs:
                    inputs.append(feed)
                outputs = runner.infer(feed)
                del feed
                writer.append(polyjson.iteration(outputs, runner.name, runner.last_inference_time()))
                for a in against:
                    want = _Spilled(self.spill_root / base / a / str(k), self.spilled[(base, a)][k])
                    self.rows += compare_point(want, outputs, data.point, job.pack, f"{a} vs {runner.name}",
                                               self.tol.atol, self.tol.rtol)
                if keep:
                    self.spilled.setdefault((base, runner.name), []).append(
                        _spill(self.spill_root / base / runner.name / str(k), outputs))
                del outputs
                # glibc keeps the point's freed buffers (ONNX Runtime's intermediates above all) in its
                # heap; the next point would then peak on top of them (about 250 MiB more at the default
                # model's N = 512, lastSum = 3584 point). The outputs went with their last
                # reference, so a trim suffices (a garbage collection per point costs 0.2 s).
                trim_heap()
        except BaseException:
            writer.abort()
            if inputs:
                inputs.abort()
            raise
        writer.close()
        files = self.written.setdefault(base, [])
        if inputs:
            inputs.close()
            files.append(inputs.path)
        files.append(out_path)
        self.ran.setdefault(base, []).append(runner.name)
