"""The ONNX file's weights handed to TensorRT's parser in place, not copied.

``parse_from_file`` reads every weight into the parser's own buffers, which live as long
as the network: one copy of the model held through the whole build, on top of the
builder's. The parser can instead take each initializer as a pointer to memory the caller
keeps alive (``load_model_proto`` + ``load_initializer``). Pointing it into a read-only
memory map of the file costs no copy, and those pages are the kernel's page cache: while
the builder runs they are dropped from this process every few tens of milliseconds
(``released_while``), and any later read faults them back in from the file.

Inline weights (the file's own ``raw_data`` fields) are found by scanning the protobuf
wire format for their offsets; external data files are mapped at the offsets the graph
records. Weights the scan cannot place stay with the parser, which reads them itself.
"""
from __future__ import annotations

import contextlib
import mmap
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvplan.lazy import lazy_import

onnx = lazy_import("onnx")

# Smaller tensors are not worth a pointer (and their bytes may not be raw_data).
MIN_BYTES = 4096
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_NAME, _TENSOR_RAW_DATA = 8, 9


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value start, value end) of each field of the message in buf[start:end]."""
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == 0:
            _, nxt = _varint(buf, pos)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 5:
            nxt = pos + 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            nxt = pos + length
        else:
            raise ValueError(f"wire type {wire} at byte {pos} is not one ONNX files use")
        if nxt > end:
            raise ValueError(f"field {number} at byte {pos} runs past its message's end")
        yield number, wire, pos, nxt
        pos = nxt


def raw_data_offsets(buf) -> dict[str, tuple[int, int]]:
    """Initializer name -> (offset, length) of its raw_data bytes within a serialized ModelProto."""
    found: dict[str, tuple[int, int]] = {}
    for number, wire, start, end in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or wire != 2:
            continue
        for g_number, g_wire, t_start, t_end in _fields(buf, start, end):
            if g_number != _GRAPH_INITIALIZER or g_wire != 2:
                continue
            name, raw = None, None
            for t_number, t_wire, v_start, v_end in _fields(buf, t_start, t_end):
                if t_number == _TENSOR_NAME and t_wire == 2:
                    name = bytes(buf[v_start:v_end]).decode()
                elif t_number == _TENSOR_RAW_DATA and t_wire == 2:
                    raw = (v_start, v_end - v_start)
            if name is not None and raw is not None:
                found[name] = raw
    return found


@dataclass
class MappedWeights:
    """A weights-free copy of the model and where each weight lies in a mapped file."""
    path: Path
    model_bytes: bytes
    entries: list[tuple[str, str, int, int]]            # name, mapped file, offset, length
    maps: dict[str, mmap.mmap] = field(default_factory=dict)
    _addresses: dict[str, int] = field(default_factory=dict)
    _keep: list = field(default_factory=list)
    releases: int = 0

    @classmethod
    def open(cls, onnx_path: Path) -> "MappedWeights":
        onnx_path = Path(onnx_path)
        model = onnx.load(str(onnx_path), load_external_data=False)
        entries: list[tuple[str, str, int, int]] = []
        inline = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL
                  and len(t.raw_data) >= MIN_BYTES]
        if inline:
            with open(onnx_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as whole:
                offsets = raw_data_offsets(whole)
            for t in inline:
                where = offsets.get(t.name)
                if where is None or where[1] != len(t.raw_data):
                    continue        # not where the scan expected it: the parser reads this one itself
                entries.append((t.name, str(onnx_path), *where))
                # From here on the graph points into its own file for this tensor: valid ONNX, and
                # what the parser would read if it ignored the pointer it is given.
                t.ClearField("raw_data")
                t.data_location = onnx.TensorProto.EXTERNAL
                for key, value in (("location", onnx_path.name), ("offset", where[0]), ("length", where[1])):
                    t.external_data.add(key=key, value=str(value))
        placed = {e[0] for e in entries}
        for t in model.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL or t.name in placed:
                continue
            ext = {e.key: e.value for e in t.external_data}
            if "location" not in ext or "length" not in ext or int(ext["length"]) < MIN_BYTES:
                continue
            entries.append((t.name, str(onnx_path.parent / ext["location"]), int(ext.get("offset", 0)),
                            int(ext["length"])))
        return cls(onnx_path, model.SerializeToString(), entries)

    def load_into(self, parser) -> str | None:
        """Give the parser the model and every mapped weight; None, or why it refused."""
        if not parser.load_model_proto(self.model_bytes, str(self.path)):
            return "the parser refused the weights-free model"
        for file in {e[1] for e in self.entries}:
            with open(file, "rb") as f:
                self.maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            view = np.frombuffer(self.maps[file], dtype=np.uint8)
            self._keep.append(view)       # the address stays valid while the view (and map) live
            self._addresses[file] = view.ctypes.data
        for name, file, offset, length in self.entries:
            if offset + length > len(self.maps[file]):
                return f"initializer {name!r} lies past the end of {file}"
            if not parser.load_initializer(name, self._addresses[file] + offset, length):
                return f"the parser refused initializer {name!r}"
        return None

    def release(self) -> None:
        """Drop the mapped pages from this process; a later read faults them back in from the file."""
        self.releases += 1
        for m in self.maps.values():
            try:
                m.madvise(mmap.MADV_DONTNEED)
            except (AttributeError, OSError, ValueError):
                pass

    @contextlib.contextmanager
    def released_while(self, interval: float = 0.05):
        """Release the pages every ``interval`` s while the block runs (the build: the builder
        reads each weight to make its own copy, with the GIL released)."""
        stop = threading.Event()

        def loop():
            while not stop.wait(interval):
                self.release()

        thread = threading.Thread(target=loop, name="kvplan-release-weights", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()
            self.release()

    @property
    def mapped_bytes(self) -> int:
        return sum(e[3] for e in self.entries)
