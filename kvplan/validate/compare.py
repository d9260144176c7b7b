"""Elementwise comparison of two runners' outputs: |a - b| <= atol + rtol * |b|, and both finite.

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


# Elements per block: a block's float32 temporaries (four of them) stay in the core's L2 cache, so the
# dozen passes of the comparison run at cache speed rather than memory speed.
BLOCK = 32768


def _flat(a) -> np.ndarray:
    """A flat numpy view (no copy for numpy arrays and memory maps; bfloat16 tensors widened)."""
    return (a if isinstance(a, np.ndarray) else as_float32(a)).reshape(-1)


# inf - inf in the error is NaN, which the comparison looks for: not worth a warning.
@np.errstate(invalid="ignore")
def compare_arrays(want, got, atol: float, rtol: float, **where) -> OutputStats:
    """The bound checked element by element, block by block; statistics as over the whole tensor."""
    if tuple(want.shape) != tuple(got.shape):
        return OutputStats(**where, max_abs=float("inf"), mean_abs=float("inf"), max_rel=float("inf"),
                           worst_index=(), worst_values=(), atol=atol, rtol=rtol, passed=False,
                           note=f"shape {list(got.shape)} != reference {list(want.shape)}")
    shape = tuple(want.shape)
    want, got = _flat(want), _flat(got)
    if want.size == 0:
        return OutputStats(**where, max_abs=0.0, mean_abs=0.0, max_rel=0.0, worst_index=(), worst_values=(),
                           atol=atol, rtol=rtol, passed=True, note="empty")
    same_bits = want.dtype == got.dtype and want.dtype.kind == "f"
    bits = np.dtype(f"u{want.dtype.itemsize}") if same_bits else None
    tiny = max(atol, np.finfo(np.float32).tiny)
    err, mag, excess, rel = (np.empty(min(BLOCK, want.size), np.float32) for _ in range(4))
    worst, worst_at = -np.inf, 0          # the largest excess over the bound, and its first element
    bad_at = None                         # the first element where either side is NaN or infinite
    nonfinite = [0, 0]                    # such elements of (want, got)
    max_abs, max_rel, total, count = 0.0, 0.0, 0.0, 0
    for start in range(0, want.size, BLOCK):
        w, g = want[start:start + BLOCK], got[start:start + BLOCK]
        m = w.size
        e, a, x, r = err[:m], mag[:m], excess[:m], rel[:m]
        np.absolute(w, out=a, dtype=np.float32)
        np.multiply(a, -rtol, out=x)
        x -= atol                                        # -(atol + rtol * |want|): the excess where err = 0
        # Bit-identical (a concat output's passed-through past rows): no error in the block, unless
        # it holds NaN or inf: the same inf on both sides is no agreement.
        if same_bits and np.array_equal(w.view(bits), g.view(bits)) and np.isfinite(x).all():
            k = int(np.argmax(x))
            count += m
            if bad_at is None and x[k] > worst:
                worst, worst_at = float(x[k]), start + k
            continue
        np.subtract(g, w, out=e, dtype=np.float32)
        np.absolute(e, out=e)
        x += e                                           # err - (atol + rtol * |want|)
        k = int(np.argmax(x))                            # NaN or +inf here wherever either side is non-finite
        if not np.isfinite(x[k]):
            bad_w, bad_g = ~np.isfinite(w), ~np.isfinite(g)
            bad = bad_w | bad_g
            if bad.any():
                nonfinite[0] += int(bad_w.sum())
                nonfinite[1] += int(bad_g.sum())
                bad_at = start + int(np.argmax(bad)) if bad_at is None else bad_at
                keep = ~bad
                e, a, r = e[keep], a[keep], r[:int(keep.sum())]
        if bad_at is None and x[k] > worst:
            worst, worst_at = float(x[k]), start + k
        if e.size:
            max_abs = max(max_abs, float(e.max()))
            total += float(e.sum(dtype=np.float64))
            count += e.size
            significant = a >= tiny
            if significant.any():
                np.divide(e, a, out=r, where=significant)
                max_rel = max(max_rel, float(r.max(initial=0.0, where=significant)))
    bad = bad_at is not None
    flat = bad_at if bad else worst_at
    idx = tuple(int(i) for i in np.unravel_index(flat, shape))
    note = (f"NaN/inf in output (reference {nonfinite[0]}, candidate {nonfinite[1]} element(s)): a non-finite "
            f"value never agrees, even with itself") if bad else ""
    return OutputStats(**where, max_abs=max_abs if count else float("nan"),
                       mean_abs=total / count if count else float("nan"), max_rel=max_rel, worst_index=idx,
                       worst_values=(float(want[flat]), float(got[flat])), atol=atol, rtol=rtol,
                       passed=not bad and worst <= 0, note=note)


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
