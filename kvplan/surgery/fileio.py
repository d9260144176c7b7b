"""surgery.fuse_file: load (external data too), run, write atomically."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from google.protobuf.message import DecodeError

from kvplan.errors import GraphError
from kvplan.fileio import atomic_directory, write_streamed
from kvplan.lazy import lazy_import
from kvplan.surgery.pipeline import PROTO_LIMIT, run
from kvplan.surgery.weights import put_back, set_aside, take_back

onnx = lazy_import("onnx")


def fuse_file(in_path, out_path, passes: Sequence[str], log: Callable[[str], None] | None = print,
              require_match: bool = False) -> dict:
    """Fuse ``in_path`` into ``out_path`` (written atomically); returns the report.

    ``require_match``: a graph in which no pass found its pattern (not a decoder, or one
    these passes do not know) is refused instead of written with only its opset raised.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise GraphError(f"{in_path}: no such ONNX file")
    try:
        model = onnx.load(str(in_path), load_external_data=True)
    except (DecodeError, ValueError, OSError) as e:
        raise GraphError(f"{in_path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.HasField("graph"):
        # Protobuf reads an empty file (or one of unrelated fields) as an empty model.
        size = in_path.stat().st_size
        what = f"{size} bytes holding no graph" if size else "an empty file"
        raise GraphError(f"{in_path}: not an ONNX model ({what})")
    aside = set_aside(model)
    fused, report = run(model, passes, log=log)
    del model
    found = sum(r["fused"] for r in report["passes"].values())
    if require_match and passes and not found:
        misses = sum(len(r["near_misses"]) for r in report["passes"].values())
        raise GraphError(f"{in_path}: no decoder pattern found: {', '.join(passes)} fused nothing in "
                         f"{report['nodes_before']} nodes ({misses} near miss(es); --report lists them); "
                         f"nothing written")
    write_atomic(fused, out_path, aside)
    return report


def write_atomic(model: onnx.ModelProto, path: Path, aside: dict[str, onnx.TensorProto] | None = None) -> None:
    """Write through kvplan.fileio's atomic writers: a temporary name in the target directory,
    renamed into place when whole.

    ``aside``: weights standing in ``model`` as inputs (surgery.weights.set_aside); they are
    written back as initializers. Up to protobuf's comfortable size the file is written with
    one weight serialized at a time (``write_streamed``); above it the weights go to a data
    file (``<name>.data``), which lands first, so a graph never appears pointing at a data
    file that is not there yet.
    """
    aside = aside or {}
    big = sum(len(t.raw_data) for t in list(model.graph.initializer) + list(aside.values())) > PROTO_LIMIT
    data = path.name + ".data"
    with atomic_directory(path, companions=(data,)) as tmp:
        if big:
            put_back(model, aside)
            onnx.save(model, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data)
        else:
            # The graph was fully checked with the weights standing in as inputs; they go back
            # in as the file is written, in place of those inputs.
            with open(tmp / path.name, "wb") as f:
                write_streamed(model, take_back(model, aside), f)
