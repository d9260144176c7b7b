"""surgery.fuse_file: load (external data too), run, write atomically.

The passes never read the weights a MatMul multiplies by (kvplan.surgery.weights), so a file with
its weights inline is read with those entries left in it (kvplan.quantize.lazy_onnx's wire-format
walk) and the fused file gets each entry's bytes copied from the input, one at a time: no weight
is parsed or serialized, and the fused graph's weights are the export's byte for byte.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from google.protobuf.message import DecodeError

from kvplan.errors import GraphError, QuantizeError
from kvplan.fileio import FileEntry, atomic_directory, write_streamed
from kvplan.lazy import lazy_import
from kvplan.quantize.lazy_onnx import read_entry, read_skeleton
from kvplan.surgery.pipeline import PROTO_LIMIT, run
from kvplan.surgery.weights import matmul_only, put_back, set_aside, take_back

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
    model, aside = _load(in_path)
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


def _load(path: Path) -> tuple[onnx.ModelProto, dict]:
    """The model, with the weights only MatMul/Gemm read set aside (kvplan.surgery.weights)."""
    try:
        model, entries = read_skeleton(path)
    except QuantizeError:       # not walkable: onnx.load below says what is wrong with it
        model, entries = None, {}
    if model is not None and not model.HasField("graph"):
        model = None
    if model is not None and not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return model, _set_aside_entries(model, path, entries)
    try:
        model = onnx.load(str(path), load_external_data=True)
    except (DecodeError, ValueError, OSError) as e:
        raise GraphError(f"{path}: not a readable ONNX model ({type(e).__name__}: {e})") from None
    if not model.HasField("graph"):
        # Protobuf reads an empty file (or one of unrelated fields) as an empty model.
        size = path.stat().st_size
        what = f"{size} bytes holding no graph" if size else "an empty file"
        raise GraphError(f"{path}: not an ONNX model ({what})")
    return model, set_aside(model)


class _Aside(FileEntry):
    """A weight left in the input file: what ``take_back`` checks (type, shape) and
    ``write_streamed`` copies."""

    def __init__(self, path: Path, offset: int, length: int, skeleton: onnx.TensorProto):
        super().__init__(path, offset, length, skeleton.name)
        self.data_type, self.dims = skeleton.data_type, list(skeleton.dims)

    def proto(self) -> onnx.TensorProto:
        return read_entry(self.path, self.offset, self.length)


def _set_aside_entries(model: onnx.ModelProto, path: Path, entries: dict) -> dict:
    """``set_aside``'s rule on a skeleton: entries only MatMul/Gemm read become inputs standing for
    the bytes in ``path``; any other entry left in the file is read back into the model."""
    movable = matmul_only(model)
    kept, aside = [], {}
    for t in model.graph.initializer:
        if t.name not in entries:
            kept.append(t)
        elif t.name in movable:
            aside[t.name] = _Aside(path, *entries[t.name])
        else:
            kept.append(read_entry(path, *entries[t.name][:2]))
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    for name, entry in aside.items():
        model.graph.input.append(onnx.helper.make_tensor_value_info(name, entry.data_type, entry.dims))
    return aside


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
    big = sum(len(t.raw_data) for t in model.graph.initializer) + sum(t.ByteSize() for t in aside.values()) > PROTO_LIMIT
    data = path.name + ".data"
    with atomic_directory(path, companions=(data,)) as tmp:
        if big:
            put_back(model, {name: t.proto() if isinstance(t, _Aside) else t for name, t in aside.items()})
            onnx.save(model, str(tmp / path.name), save_as_external_data=True, all_tensors_to_one_file=True,
                      location=data)
        else:
            # The graph was fully checked with the weights standing in as inputs; they go back
            # in as the file is written, in place of those inputs.
            with open(tmp / path.name, "wb") as f:
                write_streamed(model, take_back(model, aside), f)
