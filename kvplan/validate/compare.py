"""Elementwise comparison of two runners' outputs: |a - b| <= atol + rtol * |b|.

Polygraphy's own SimpleCompareFunc passes an element when *either* the absolute or
the relative error is within tolerance; the issue asks for the combined
allclose-style bound, so the verdict is computed here over the Comparator's
RunResults, with the statistics the report needs (and every tensor named).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kvplan.validate.points import as_float32


@dataclass
class OutputStats:
    point: str
    pack: int
    pair: str               # "reference vs candidate"
    output: str
    max_abs: float
    mean_abs: float
    max_rel: float          # over elements with |reference| >= atol (relative error of ~0 is noise)
    worst_index: tuple      # element with the largest excess over the bound
    worst_values: tuple     # (reference, candidate) there
    atol: float
    rtol: float
    passed: bool
    note: str = ""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["worst_index"] = list(self.worst_index)
        d["worst_values"] = list(self.worst_values)
        return d


def compare_arrays(want, got, atol: float, rtol: float, **where) -> OutputStats:
    want, got = as_float32(want), as_float32(got)
    if want.shape != got.shape:
        return OutputStats(**where, max_abs=float("inf"), mean_abs=float("inf"), max_rel=float("inf"),
                           worst_index=(), worst_values=(), atol=atol, rtol=rtol, passed=False,
                           note=f"shape {list(got.shape)} != reference {list(want.shape)}")
    if want.size == 0:
        return OutputStats(**where, max_abs=0.0, mean_abs=0.0, max_rel=0.0, worst_index=(), worst_values=(),
                           atol=atol, rtol=rtol, passed=True, note="empty")
    # Few passes over the arrays (the default model's concat outputs are 3 M elements each, compared
    # against two runners at every point): every temporary is written in place.
    err = np.subtract(got, want)
    np.abs(err, out=err)
    magnitude = np.abs(want)
    excess = np.multiply(magnitude, -rtol)
    excess -= atol
    excess += err                                    # err - (atol + rtol * |want|)
    nan = bool(np.isnan(excess).any())               # a NaN in either array is one in err
    if nan:
        # NaN never passes: treat it as an infinite excess so it is the worst element.
        excess[np.isnan(excess)] = np.inf
    flat = int(np.argmax(excess))
    idx = tuple(int(i) for i in np.unravel_index(flat, want.shape))
    significant = magnitude >= max(atol, np.finfo(np.float32).tiny)
    if significant.any():
        np.divide(err, magnitude, out=magnitude, where=significant)
        max_rel = float(magnitude.max(initial=0.0, where=significant))
    else:
        max_rel = 0.0
    finite = err[~np.isnan(err)] if nan else err
    return OutputStats(**where, max_abs=float(finite.max()) if finite.size else float("nan"),
                       mean_abs=float(finite.mean()) if finite.size else float("nan"), max_rel=max_rel, worst_index=idx,
                       worst_values=(float(want[idx]), float(got[idx])), atol=atol, rtol=rtol,
                       passed=bool(excess[idx] <= 0) and not nan, note="NaN in output" if nan else "")


def compare_point(want, got, point, pack: int, pair: str, atol: float, rtol: float) -> list[OutputStats]:
    """Every output of one point: ``want`` (the reference side) against ``got``, both {name: array}."""
    rows = []
    for output in want.keys():
        where = dict(point=point.label, pack=pack, pair=pair, output=output)
        if output not in got:
            rows.append(OutputStats(**where, max_abs=float("inf"), mean_abs=float("inf"), max_rel=float("inf"),
                                    worst_index=(), worst_values=(), atol=atol, rtol=rtol, passed=False,
                                    note=f"{pair.split(' vs ')[-1]} has no output {output}"))
            continue
        rows.append(compare_arrays(want[output], got[output], atol, rtol, **where))
    return rows


def compare_runs(run_results, pairs: list[tuple[str, str]], points: list, pack: int,
                 atol: float, rtol: float) -> list[OutputStats]:
    """Every output of every iteration (point) for each (reference, candidate) runner pair."""
    by_runner = {name: iterations for name, iterations in run_results}
    rows = []
    for ref_name, cand_name in pairs:
        if ref_name not in by_runner or cand_name not in by_runner:
            continue
        for point, want, got in zip(points, by_runner[ref_name], by_runner[cand_name]):
            rows += compare_point(want, got, point, pack, f"{ref_name} vs {cand_name}", atol, rtol)
    return rows
