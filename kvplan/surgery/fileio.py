"""surgery.fuse_file: load (external data too), run, write atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import onnx
from google.protobuf.message import DecodeError

from kvplan.errors import GraphError
from kvplan.fileio import temp_prefix, umask, write_streamed
from kvplan.surgery.pipeline import PROTO_LIMIT, run
from kvplan.surgery.weights import put_back, set_aside, take_back


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
    """Write to temporary names in the target directory, then os.replace into place.

    ``aside``: weights standing in ``model`` as inputs (surgery.weights.set_aside); they are
    written back as initializers. Up to protobuf's comfortable size the file is written with
    one weight serialized at a time (``write_streamed``); above it the weights go to a data
    file (``<name>.data``), which lands first, so a graph never appears pointing at a data
    file that is not there yet.
    """
    aside = aside or {}
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(len(t.raw_data) for t in list(model.graph.initializer) + list(aside.values())) > PROTO_LIMIT
    data = path.parent / (path.name + ".data")
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), dir=path.parent)
    tmp_data = Path(tmp + ".data")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file private (0600); the result should have the mode any new file gets.
            os.fchmod(f.fileno(), 0o666 & ~umask())
            if not big:
                # The graph was fully checked with the weights standing in as inputs; they go back
                # in as the file is written, in place of those inputs.
                write_streamed(model, take_back(model, aside), f)
                f.flush()
                os.fsync(f.fileno())
        if big:
            put_back(model, aside)
            # The location recorded in the graph is the final data name; the bytes go to a
            # temporary file that is renamed to it.
            onnx.save(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=tmp_data.name)
            _relocate(tmp, tmp_data.name, data.name)
            os.chmod(tmp_data, 0o666 & ~umask())      # onnx creates its data files private
            os.replace(tmp_data, data)
        else:
            data.unlink(missing_ok=True)  # a stale data file from an earlier, larger write
        os.replace(tmp, path)
    finally:
        for p in (Path(tmp), tmp_data):
            p.unlink(missing_ok=True)


def _relocate(graph_path: str, old: str, new: str) -> None:
    """Point the saved graph's external-data entries at ``new`` instead of ``old``."""
    m = onnx.load(graph_path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value == old:
                e.value = new
    onnx.save(m, graph_path)
