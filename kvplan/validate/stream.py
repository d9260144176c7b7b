"""Runners driven one after the other over a group of points, each point compared and saved as it comes.

Memory is what one runner needs for one point: only the running runner is active (an ONNX
Runtime session holds its own copy of the weights, so two alive at once would hold two),
each point's feed is built when it is fed and dropped after, and each output is written to
the Polygraphy JSON file, compared with the earlier runners' outputs of the same point and
dropped. Earlier runners' outputs wait on disk (a private spill directory, removed at the
end) and are read back memory-mapped, one tensor at a time.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

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


def run_group(runners, group, feed_of, vdir: Path, base: str, pairs, pack: int, tol, meter, not_run: dict,
              log, why_not=None) -> tuple[list, list[str], list[Path]]:
    """Run ``runners`` in order over the points ``group`` (``feed_of(point_data)`` makes a feed).

    Writes ``<base>.inputs.json`` and ``<base>.outputs.<runner>.json`` under ``vdir`` and compares
    every (earlier, later) pair of ``pairs`` on every output of every point. A runner whose
    activation fails is recorded in ``not_run`` with ``why_not(runner, error)`` (None: re-raise).
    Returns (comparison rows, the runners that ran, the files written).
    """
    rows, ran, written = [], [], []
    names_in_group = [r.name for r in runners]
    with tempfile.TemporaryDirectory(prefix=".spill-", dir=vdir) as spill_root:
        spill_root = Path(spill_root)
        spilled: dict[str, list[list[str]]] = {}      # runner -> per point, its output names
        inputs = None
        for r_index, runner in enumerate(runners):
            later = names_in_group[r_index + 1:]
            keep = any(a == runner.name and b in later for a, b in pairs)
            against = [a for a, b in pairs if b == runner.name and a in spilled]
            try:
                runner.activate()
            except Exception as e:
                why = why_not(runner, e) if why_not else None
                if why is None:
                    raise
                not_run.setdefault(runner.name, why)
                log(f"[validate]   {runner.name}: not run ({why})")
                continue
            out_path = vdir / f"{base}.outputs.{runner.name}.json"
            writer = polyjson.outputs_writer(out_path, runner.name)
            first = inputs is None
            if first:
                inputs = polyjson.inputs_writer(vdir / f"{base}.inputs.json")
            try:
                with meter.phase(runner.name):
                    for k, data in enumerate(group):
                        feed = feed_of(data)
                        if first:
                            inputs.append(feed)
                        outputs = runner.infer(feed)
                        del feed
                        writer.append(polyjson.iteration(outputs, runner.name, runner.last_inference_time()))
                        for a in against:
                            want = _Spilled(spill_root / a / str(k), spilled[a][k])
                            rows += compare_point(want, outputs, data.point, pack, f"{a} vs {runner.name}",
                                                  tol.atol, tol.rtol)
                        if keep:
                            spilled.setdefault(runner.name, []).append(
                                _spill(spill_root / runner.name / str(k), outputs))
                        del outputs
            except BaseException:
                writer.abort()
                if first:
                    inputs.abort()
                raise
            finally:
                runner.deactivate()
            writer.close()
            if first:
                inputs.close()
                written.append(inputs.path)
            written.append(out_path)
            ran.append(runner.name)
    # The inputs file first, then the outputs in runner order, as before.
    return rows, ran, written
