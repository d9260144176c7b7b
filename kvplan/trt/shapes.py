"""Optimization-profile shapes: every contract input's (min, opt, max) from a Shapes."""
from __future__ import annotations

from kvplan.profiles import BATCH_AXIS, Profile
from kvplan.trt.errors import BuildError

SYMBOLS = ("N", "lastSum", "sumN", BATCH_AXIS)


def shapes_for(contract: dict, profile: Profile) -> dict[str, dict[str, tuple[tuple[int, ...], ...]]]:
    """profile name -> input name -> (min, opt, max) shapes.

    Symbolic axes of the contract (``N``, ``lastSum``, ``sumN``) take the Shapes's
    ranges, sumN = N + lastSum at each of min/opt/max; a dynamic batch ``B`` takes the
    profile's batch range in every optimization profile; integer axes (a static batch,
    heads, ...) are fixed.
    """
    inputs = contract["inputs"]
    out: dict[str, dict[str, tuple[tuple[int, ...], ...]]] = {}
    for sp in profile.shapes:
        ranges = {"N": sp.N, "lastSum": sp.lastSum, "sumN": sp.sumN, BATCH_AXIS: profile.export.batch_range}
        per_input = {}
        for name, info in inputs.items():
            triple = []
            for which in ("min", "opt", "max"):
                dims = []
                for d in info["shape"]:
                    if isinstance(d, str):
                        if d not in ranges:
                            raise BuildError(f"input {name!r}: unknown symbolic axis {d!r} (known: {', '.join(SYMBOLS)})")
                        dims.append(int(getattr(ranges[d], which)))
                    else:
                        dims.append(int(d))
                triple.append(tuple(dims))
            per_input[name] = tuple(triple)
        out[sp.name] = per_input
    return out


def dims(shape) -> list[int]:
    """A TensorRT Dims as a list of ints (-1 for dynamic axes)."""
    return [int(d) for d in shape]
