"""Load an ONNX file with its large initializers left in the file, read back one at a time.

``ir.load`` of a file with inline weights parses every weight into memory (the fp16 default
model: 360 MiB) and the int4 rewrite then holds them all beside its own results. Here the
file is walked in protobuf's wire format instead: every field but the graph's large
initializer entries is read (nodes, inputs, small constants: a few MiB), and each large entry
is remembered by its offset and length. Its ``const_value`` is a ``SourceTensor`` that re-reads
and parses that one entry when asked for its values, so the rewrite holds one weight at a time.
Saving writes the entry's own bytes back unchanged (what ``ir.serde`` does for a tensor it
parsed: it copies the parsed proto), so an untouched weight is byte-identical in the output.
"""
from __future__ import annotations

from pathlib import Path

from google.protobuf.message import DecodeError

from kvplan.errors import QuantizeError
from kvplan.fileio import GRAPH_FIELD, INITIALIZER_FIELD, FileEntry, field_header
from kvplan.lazy import lazy_import

onnx = lazy_import("onnx")
ir = lazy_import("onnx_ir")

# Entries at least this big stay in the file (every linear; norms and shape constants are read).
LAZY_BYTES = 64 * 1024


class SourceTensor(ir.LazyTensor):
    """One initializer entry of ``path`` at ``offset`` (``length`` bytes), parsed on each use."""

    def __init__(self, path: Path, offset: int, length: int, skeleton: onnx.TensorProto):
        self.path, self.offset, self.length = path, offset, length
        super().__init__(lambda: ir.serde.deserialize_tensor(self.proto()),
                         ir.DataType(skeleton.data_type), ir.Shape(list(skeleton.dims)), name=skeleton.name)

    def proto(self) -> onnx.TensorProto:
        return read_entry(self.path, self.offset, self.length)

    @property
    def file_entry(self) -> FileEntry:
        """The entry's bytes in the file, for a writer to copy unparsed (kvplan.fileio.ir_entry)."""
        return FileEntry(self.path, self.offset, self.length, self.name)


def _varint(f) -> int:
    shift = result = 0
    while True:
        b = f.read(1)
        if not b:
            raise EOFError
        result |= (b[0] & 0x7F) << shift
        if b[0] < 0x80:
            return result
        shift += 7


def _fields(f, end: int):
    """(field number, wire type, payload offset, payload length, tag bytes) up to offset ``end``."""
    while f.tell() < end:
        start = f.tell()
        key = _varint(f)
        number, wire = key >> 3, key & 7
        if wire == 2:
            length = _varint(f)
        elif wire == 0:
            _varint(f)
            length = 0
        elif wire in (1, 5):
            length = 8 if wire == 1 else 4
        else:
            raise ValueError(f"wire type {wire} at byte {start}")
        offset = f.tell()
        f.seek(offset + length)
        yield number, wire, start, offset, length


# TensorProto's value fields (float_data, int32_data, string_data, int64_data, raw_data, double_data,
# uint64_data): a skeleton keeps every other field (name, dims, data_type, doc_string, metadata).
TENSOR_DATA_FIELDS = (4, 5, 6, 7, 9, 10, 11)


def _skeleton(f, offset: int, length: int) -> onnx.TensorProto:
    """The TensorProto entry at ``offset`` without its values, read field by field (parsing the
    whole entry and clearing its data would keep the data in protobuf's arena)."""
    kept = bytearray()
    f.seek(offset)
    for number, _, start, payload, size in _fields(f, offset + length):
        if number not in TENSOR_DATA_FIELDS:
            here = f.tell()
            f.seek(start)
            kept += f.read(payload + size - start)
            f.seek(here)
    return onnx.TensorProto.FromString(bytes(kept))


def read_skeleton(path: Path) -> tuple[onnx.ModelProto, dict[str, tuple[int, int, onnx.TensorProto]]]:
    """``path``'s model with every large initializer entry a skeleton (no values), and each such
    entry's (offset, length, skeleton) in the file, by name."""
    size = path.stat().st_size
    top, graph, lazy, seen_graph = bytearray(), bytearray(), {}, False
    try:
        with open(path, "rb") as f:
            for number, wire, start, offset, length in _fields(f, size):
                if number != GRAPH_FIELD or wire != 2:
                    f.seek(start)
                    top += f.read(offset + length - start)
                    continue
                f.seek(offset)
                seen_graph = True
                for sub, sub_wire, s_start, s_offset, s_length in _fields(f, offset + length):
                    here = f.tell()
                    f.seek(s_start)
                    if sub == INITIALIZER_FIELD and sub_wire == 2 and s_length >= LAZY_BYTES:
                        skeleton = _skeleton(f, s_offset, s_length)
                        lazy[skeleton.name] = (s_offset, s_length, skeleton)
                        blob = skeleton.SerializeToString()
                        graph += field_header(INITIALIZER_FIELD, len(blob)) + blob
                    else:
                        graph += f.read(s_offset + s_length - s_start)
                    f.seek(here)
    except (EOFError, ValueError) as e:
        raise QuantizeError(f"{path}: not a readable ONNX file ({e})") from None
    if seen_graph:
        top += field_header(GRAPH_FIELD, len(graph)) + graph
    try:
        return onnx.ModelProto.FromString(bytes(top)), lazy
    except DecodeError as e:
        raise QuantizeError(f"{path}: not a readable ONNX file ({e})") from None


def read_entry(path: Path, offset: int, length: int) -> onnx.TensorProto:
    """The initializer entry of ``length`` bytes at ``offset`` of ``path``."""
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:
        raise QuantizeError(f"{path}: truncated at byte {offset}")
    return onnx.TensorProto.FromString(data)


def load_lazy(path: Path) -> ir.Model:
    """``path`` as an ir.Model whose large initializers are ``SourceTensor``s (see the module)."""
    proto, lazy = read_skeleton(path)
    model = ir.serde.deserialize_model(proto)
    ir.external_data.set_base_dir(model.graph, path.parent)
    for name, (offset, length, skeleton) in lazy.items():
        value = model.graph.initializers[name]
        value.const_value = SourceTensor(path, offset, length, skeleton)
    return model
