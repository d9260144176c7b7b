"""surgery.fuse_file: load (external data too), run, write atomically."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Sequence

import onnx

from .pipeline import PROTO_LIMIT, run
from .weights import put_back, set_aside, take_back


def fuse_file(in_path, out_path, passes: Sequence[str], log: Callable[[str], None] | None = print) -> dict:
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise FileNotFoundError(f"no such ONNX file: {in_path}")
    model = onnx.load(str(in_path), load_external_data=True)
    aside = set_aside(model)
    fused, report = run(model, passes, log=log)
    del model
    write_atomic(fused, out_path, aside)
    return report


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_GRAPH_FIELD = 7          # ModelProto.graph
_INITIALIZER_FIELD = 5    # GraphProto.initializer


def _field(number: int, length: int) -> bytes:
    return _varint(number << 3 | 2) + _varint(length)     # wire type 2: length-delimited


def write_streamed(head: onnx.ModelProto, tensors: Callable[[], Iterable[onnx.TensorProto]], f) -> None:
    """Write ``head`` with the initializers ``tensors()`` yields appended to its graph, to ``f``.

    ``model.SerializeToString()`` would hold two extra copies of every weight (the proto and
    its bytes). Protobuf lets a message's fields come in any order, and a repeated field's
    entries may be spread out, so the file is written as the model without its graph, then
    the graph field: the graph's own bytes followed by one initializer entry per tensor,
    each serialized when it is written. ``tensors`` is called twice (sizes, then bytes).
    """
    rest = onnx.ModelProto()
    rest.CopyFrom(head)
    rest.ClearField("graph")
    graph = head.graph.SerializeToString()
    sizes = [t.ByteSize() for t in tensors()]
    graph_len = len(graph) + sum(len(_field(_INITIALIZER_FIELD, n)) + n for n in sizes)
    f.write(rest.SerializeToString())
    f.write(_field(_GRAPH_FIELD, graph_len))
    f.write(graph)
    for size, t in zip(sizes, tensors()):
        data = t.SerializeToString()
        if len(data) != size:
            raise RuntimeError(f"initializer {t.name!r} serialized to {len(data)} bytes, {size} expected")
        f.write(_field(_INITIALIZER_FIELD, size))
        f.write(data)


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
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp_data = Path(tmp + ".data")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates the file private (0600); the result should have the mode any new file gets.
            os.fchmod(f.fileno(), 0o666 & ~_umask())
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
            os.chmod(tmp_data, 0o666 & ~_umask())      # onnx creates its data files private
            os.replace(tmp_data, data)
        else:
            data.unlink(missing_ok=True)  # a stale data file from an earlier, larger write
        os.replace(tmp, path)
    finally:
        for p in (Path(tmp), tmp_data):
            p.unlink(missing_ok=True)


def _umask() -> int:
    # Read, not set-and-restore: os.umask would change it for every thread for a moment.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _relocate(graph_path: str, old: str, new: str) -> None:
    """Point the saved graph's external-data entries at ``new`` instead of ``old``."""
    m = onnx.load(graph_path, load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location" and e.value == old:
                e.value = new
    onnx.save(m, graph_path)
