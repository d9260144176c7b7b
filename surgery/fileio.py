"""surgery.fuse_file: load (external data too), run, write atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Sequence

import onnx

from .pipeline import PROTO_LIMIT, _big, run
from .weights import put_back, set_aside


def fuse_file(in_path, out_path, passes: Sequence[str], log: Callable[[str], None] | None = print) -> dict:
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {in_path}")
    model = onnx.load(str(in_path), load_external_data=True)
    aside = set_aside(model)
    fused, report = run(model, passes, log=log)
    del model
    put_back(fused, aside)
    if aside and not _big(fused):
        # The graph was fully checked with the weights standing in as inputs; this confirms
        # the restored initializers fit it (over 2 GB the file is checked by path in writing).
        onnx.checker.check_model(fused)
    write_atomic(fused, out_path)
    return report


def write_atomic(model: onnx.ModelProto, path: Path) -> None:
    """Write to temporary names in the target directory, then os.replace into place.

    The data file (``<name>.data``, used only above protobuf's comfortable size) lands
    first, so a graph never appears pointing at a data file that is not there yet.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sum(len(t.raw_data) for t in model.graph.initializer) > PROTO_LIMIT
    data = path.parent / (path.name + ".data")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_data = Path(tmp + ".data")
    try:
        if big:
            # The location recorded in the graph is the final data name; the bytes go to a
            # temporary file that is renamed to it.
            onnx.save(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                      location=tmp_data.name)
            _relocate(tmp, tmp_data.name, data.name)
            os.replace(tmp_data, data)
        else:
            onnx.save(model, tmp)
            if data.exists():
                data.unlink()  # a stale data file from an earlier, larger write
        os.replace(tmp, path)
    finally:
        for p in (Path(tmp), tmp_data):
            if p.exists():
                p.unlink()


def _relocate(graph_path: str, old: str, new: str) -> None:
    """Point the saved graph's external-data entries at ``new`` instead of ``old``."""
    m = onnx.load(graph_path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value == old:
                e.value = new
    onnx.save(m, graph_path)
