"""The ONNX file's weights handed to TensorRT's parser in place, not copied.

``parse_from_file`` reads every weight into the parser's own buffers, which live as long
as the network: one copy of the model held through the whole build, on top of the
builder's. The parser can instead take each initializer as a pointer to memory the caller
keeps alive (``load_model_proto`` + ``load_initializer``). Pointing it into a read-only
memory map of the file costs no copy, and those pages are the kernel's page cache: while
the builder runs they are dropped from this process every few milliseconds (``release``,
called by kvplan.trt.build), and any later read faults them back in from the file.

The weights-free model is written straight from the file's protobuf wire format, read
through the same map: every initializer with ``raw_data`` becomes a reference into its own
file at the offset of those bytes, and everything else is copied as it is. Deserializing the
model instead (``onnx.load``, even without external data) would copy every weight onto the
heap for a moment, and glibc kept those pages under the builder's peak (366 MiB of the default
model's 360 MiB, measured in a whole pipeline). External data files are mapped at the offsets
the graph records. Weights the scan cannot place stay with the parser, which reads them itself.
"""
from __future__ import annotations

import mmap
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

# Smaller tensors are not worth a pointer (and their bytes may not be raw_data).
MIN_BYTES = 4096
# Field numbers of onnx.proto's ModelProto.graph, GraphProto.initializer and TensorProto, and
# the wire types the scan reads (varint, length-delimited).
_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 8, 9, 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2
_VARINT, _BYTES = 0, 2
_EXTERNAL = 1                    # TensorProto.DataLocation.EXTERNAL


def _varint(buf, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if byte < 0x80:
            return result, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _BYTES) + _encode_varint(len(payload)) + payload


def _fields(buf, start: int, end: int):
    """(field number, wire type, field start, value start, value end) of each field of the message
    in buf[start:end]; a field's bytes, tag included, are buf[field start:value end]."""
    pos = start
    while pos < end:
        first = pos
        tag, pos = _varint(buf, pos)
        number, wire = tag >> 3, tag & 7
        if wire == _VARINT:
            _, nxt = _varint(buf, pos)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 5:
            nxt = pos + 4
        elif wire == _BYTES:
            length, pos = _varint(buf, pos)
            nxt = pos + length
        else:
            raise ValueError(f"wire type {wire} at byte {pos} is not one ONNX files use")
        if nxt > end:
            raise ValueError(f"field {number} at byte {pos} runs past its message's end")
        yield number, wire, first, pos, nxt
        pos = nxt


def _text(buf, start: int, end: int) -> str:
    return bytes(buf[start:end]).decode()


def _tensor(buf, start: int, end: int, own: Path) -> tuple[bytes | None, tuple[str, str, int, int] | None]:
    """One initializer: (its bytes rewritten as a reference into ``own``, or None to copy it as it is;
    the mapped entry, or None when it is not worth one or the scan cannot place it)."""
    name, raw, location, external, kept = None, None, 0, {}, []
    for number, wire, first, v_start, v_end in _fields(buf, start, end):
        if number == _TENSOR_RAW_DATA and wire == _BYTES:
            raw = (v_start, v_end - v_start)
            continue
        if number == _TENSOR_DATA_LOCATION and wire == _VARINT:
            location = _varint(buf, v_start)[0]
            continue
        if number == _TENSOR_NAME and wire == _BYTES:
            name = _text(buf, v_start, v_end)
        elif number == _TENSOR_EXTERNAL_DATA and wire == _BYTES:
            entry = {n: _text(buf, s, e) for n, w, _, s, e in _fields(buf, v_start, v_end) if w == _BYTES}
            external[entry.get(_ENTRY_KEY, "")] = entry.get(_ENTRY_VALUE, "")
        kept.append(bytes(buf[first:v_end]))
    if name is None:
        return None, None
    if location == _EXTERNAL:
        if "location" not in external or "length" not in external or int(external["length"]) < MIN_BYTES:
            return None, None
        return None, (name, str(own.parent / external["location"]), int(external.get("offset", 0)),
                      int(external["length"]))
    if raw is None or raw[1] < MIN_BYTES or external:
        return None, None
    # From here on the graph points into its own file for this tensor: valid ONNX, and what the
    # parser would read if it ignored the pointer it is given.
    for key, value in (("location", own.name), ("offset", raw[0]), ("length", raw[1])):
        kept.append(_length_delimited(_TENSOR_EXTERNAL_DATA,
                                      _length_delimited(_ENTRY_KEY, key.encode())
                                      + _length_delimited(_ENTRY_VALUE, str(value).encode())))
    kept.append(_encode_varint(_TENSOR_DATA_LOCATION << 3 | _VARINT) + _encode_varint(_EXTERNAL))
    return b"".join(kept), (name, str(own), *raw)


def weights_free_model(buf, own: Path) -> tuple[bytes, list[tuple[str, str, int, int]]]:
    """The serialized ModelProto in ``buf`` (the file ``own``) without its weights, and where each
    weight lies: (name, file, offset, length) per initializer of at least MIN_BYTES."""
    model, entries = [], []
    for number, wire, first, start, end in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or wire != _BYTES:
            model.append(bytes(buf[first:end]))
            continue
        graph = []
        for g_number, g_wire, g_first, t_start, t_end in _fields(buf, start, end):
            rewritten, entry = None, None
            if g_number == _GRAPH_INITIALIZER and g_wire == _BYTES:
                rewritten, entry = _tensor(buf, t_start, t_end, own)
            graph.append(_length_delimited(_GRAPH_INITIALIZER, rewritten) if rewritten is not None
                         else bytes(buf[g_first:t_end]))
            if entry is not None:
                entries.append(entry)
        model.append(_length_delimited(_MODEL_GRAPH, b"".join(graph)))
    return b"".join(model), entries


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
        with open(onnx_path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as whole:
            model_bytes, entries = weights_free_model(whole, onnx_path)
        return cls(onnx_path, model_bytes, entries)

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

    @property
    def mapped_bytes(self) -> int:
        return sum(e[3] for e in self.entries)
