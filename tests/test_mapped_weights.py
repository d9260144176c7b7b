"""The engine build's parser reads the weights in place from a memory map of the ONNX file:
every mapped byte range is exactly the initializer's data, in either file layout."""
from __future__ import annotations

import time

import numpy as np
import onnx
import pytest

from kvplan.trt.build import MemoryReturned
from kvplan.trt.mapped_weights import MIN_BYTES, MappedWeights


@pytest.fixture(scope="module")
def tiny_onnx(export_tiny):
    [pack] = export_tiny("tiny-llama", "float32")
    return pack.path


def _file_bytes(path, offset, length):
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


@pytest.mark.parametrize("layout", ["streamed", "serialized"])
def test_the_weights_free_model_is_the_graph_with_every_weight_a_reference(tiny_onnx, tmp_path, layout):
    """The export's streamed file (graph field, then one initializer at a time) and a plain
    onnx.save of the same model: the model written from the wire format is the one onnx itself
    makes by turning each mapped initializer into an external reference into the file."""
    path = tiny_onnx
    if layout == "serialized":
        path = tmp_path / "plain.onnx"
        onnx.save(onnx.load(tiny_onnx), path)
    weights = MappedWeights.open(path)
    expected = onnx.load(path)
    data = path.read_bytes()
    mapped = {name: (offset, length) for name, _, offset, length in weights.entries}
    assert set(mapped) == {t.name for t in expected.graph.initializer if len(t.raw_data) >= MIN_BYTES}
    for t in expected.graph.initializer:
        if t.name in mapped:
            offset, length = mapped[t.name]
            assert data[offset:offset + length] == t.raw_data, t.name
            t.ClearField("raw_data")
            t.data_location = onnx.TensorProto.EXTERNAL
            for key, value in (("location", path.name), ("offset", offset), ("length", length)):
                t.external_data.add(key=key, value=str(value))
    assert onnx.ModelProto.FromString(weights.model_bytes) == expected


def test_small_initializers_stay_in_the_model(tiny_onnx):
    weights = MappedWeights.open(tiny_onnx)
    small = {t.name: t.raw_data for t in onnx.load(tiny_onnx).graph.initializer if len(t.raw_data) < MIN_BYTES}
    assert small
    kept = {t.name: t.raw_data for t in onnx.ModelProto.FromString(weights.model_bytes).graph.initializer
            if t.name in small}
    assert kept == small


def test_inline_weights_become_references_into_the_file_itself(tiny_onnx):
    weights = MappedWeights.open(tiny_onnx)
    assert weights.entries and all(file == str(tiny_onnx) for _, file, _, _ in weights.entries)
    stripped = onnx.ModelProto.FromString(weights.model_bytes)
    original = {t.name: t.raw_data for t in onnx.load(tiny_onnx).graph.initializer}
    for name, _, offset, length in weights.entries:
        [t] = [t for t in stripped.graph.initializer if t.name == name]
        ext = {e.key: e.value for e in t.external_data}
        assert not t.raw_data and t.data_location == onnx.TensorProto.EXTERNAL
        assert ext == {"location": tiny_onnx.name, "offset": str(offset), "length": str(length)}
        assert _file_bytes(tiny_onnx, offset, length) == original[name]
    # A weights-free model: a few KB of graph.
    assert len(weights.model_bytes) < tiny_onnx.stat().st_size - weights.mapped_bytes + 4096


def test_external_data_is_mapped_at_the_offsets_the_graph_records(tiny_onnx, tmp_path):
    model = onnx.load(tiny_onnx)
    original = {t.name: t.raw_data for t in model.graph.initializer}
    path = tmp_path / "ext.onnx"
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.onnx.data",
              size_threshold=0)
    weights = MappedWeights.open(path)
    assert weights.entries and all(file == str(tmp_path / "ext.onnx.data") for _, file, _, _ in weights.entries)
    for name, file, offset, length in weights.entries:
        assert _file_bytes(file, offset, length) == original[name]


def test_released_pages_read_back_the_same_bytes(tiny_onnx):
    """The build drops the pages from the process every few milliseconds; the parser's pointers stay
    valid and read the file."""
    weights = MappedWeights.open(tiny_onnx)

    class Parser:           # records what a parser would be given
        def __init__(self):
            self.given = {}

        def load_model_proto(self, model, path):
            return True

        def load_initializer(self, name, address, size):
            self.given[name] = (address, size)
            return True

    parser = Parser()
    assert weights.load_into(parser) is None
    before = {n: np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * s).from_address(a)).tobytes()
              for n, (a, s) in parser.given.items()}
    with MemoryReturned(weights, interval=0.001) as returned:
        time.sleep(0.05)
    assert weights.releases == returned.rounds > 2     # the thread's, then the last one on the way out
    after = {n: np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * s).from_address(a)).tobytes()
             for n, (a, s) in parser.given.items()}
    assert after == before
    assert before == {n: _file_bytes(tiny_onnx, o, s) for n, _, o, s in weights.entries}


def test_a_tensor_past_the_end_of_its_file_is_refused(tiny_onnx):
    weights = MappedWeights.open(tiny_onnx)
    name, file, offset, length = weights.entries[0]
    weights.entries[0] = (name, file, len(tiny_onnx.read_bytes()), length)

    class Parser:
        def load_model_proto(self, model, path):
            return True

        def load_initializer(self, *a):
            return True

    assert weights.load_into(Parser()) == f"initializer {name!r} lies past the end of {file}"
