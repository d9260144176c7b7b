"""Export: a decoder stack (one pack of layers) to ONNX with a flattened KV cache.

The graph is written op by op (kvplan/export/emit.py), opset 23 (24 with the in-place
cache write), so the fused ops the surgery stage writes (RMSNormalization,
RotaryEmbedding, Attention) need no version conversion afterwards. Weights are
initializers, each linear's stored transposed for its MatMul; the graph's dynamic axes
are named N, lastSum and sumN (and B for a dynamic batch), the names deployment code
and trtexec shape strings use.
"""
from __future__ import annotations

import concurrent.futures
import math
import time
from dataclasses import dataclass
from pathlib import Path

from kvplan.config import DecoderConfig
from kvplan.errors import ExportError
from kvplan.export import emit
from kvplan.export.emit import LINEAR_MARK
from kvplan.fileio import atomic_directory, ir_entry, write_streamed
from kvplan.lazy import lazy_import
from kvplan.models import ModelSource
from kvplan.models.presets import tensor_shapes
from kvplan.stack import (  # noqa: F401
    StackSpec,
    input_names,
    io_contract,
    kv_shape,
    layer_tensor_shapes,
    output_names,
    pack_file_names,
    pack_specs,
)

onnx = lazy_import("onnx")
ir = lazy_import("onnx_ir")
ml_dtypes = lazy_import("ml_dtypes")
torch = lazy_import("torch")

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPSET = 23
# protobuf refuses messages over 2 GiB; stay clearly below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def example_inputs(cfg: DecoderConfig, spec: StackSpec, batch: int, dtype: torch.dtype,
                   n: int, last: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs at (N, lastSum), causal mask; distinct sizes so tracing keeps the axes apart.

    kv_io = "inplace": the past is a buffer of ``spec.cache_len`` rows whose rows from
    lastSum on are random (stale) data the mask hides.
    """
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, n, cfg.hidden_size, generator=g).to(dtype)
    inplace = spec.kv_io == "inplace"
    mask = causal_mask(batch, n, last, dtype, length=spec.cache_len if inplace else None)
    pos = torch.arange(last, last + n, dtype=torch.int64).expand(batch, n).contiguous()
    past = []
    for _ in spec.layers:
        for _ in range(2):
            past.append(torch.randn(kv_shape(cfg, spec, batch, spec.cache_len if inplace else last),
                                    generator=g).to(dtype))
    if inplace:
        return (hidden, mask, pos, torch.full((batch,), last, dtype=torch.int64), *past)
    return (hidden, mask, pos, *past)


def causal_mask(batch: int, n: int, last: int, dtype: torch.dtype, length: int | None = None,
                window: int = 0) -> torch.Tensor:
    """Additive mask [B, 1, N, length]: 0 where a query may attend, finfo.min elsewhere.

    ``length`` defaults to lastSum + N; a longer one (an in-place buffer) masks the rows
    past lastSum + N as well. ``window`` (a model's sliding_window, 0: none) also masks the
    keys ``window`` or more positions behind the query: that is how a runtime gives the
    graph Mistral's (or Phi-3's) sliding window.
    """
    length = last + n if length is None else length
    if length < last + n:
        raise ValueError(f"mask length {length} < lastSum + N = {last + n}")
    q = torch.arange(last, last + n)[:, None]
    k = torch.arange(length)[None, :]
    mask = torch.zeros(n, length, dtype=dtype)
    hidden = k > q
    if window:
        hidden |= q - k >= window
    mask.masked_fill_(hidden, torch.finfo(dtype).min)
    return mask.expand(batch, 1, n, length).contiguous()


@dataclass
class PackExport:
    spec: StackSpec
    path: Path
    external_data: bool
    weight_bytes: int
    seconds: float


IR_DTYPES = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16,
             "bfloat16": ir.DataType.BFLOAT16, "int64": ir.DataType.INT64}


def _graph_value(name: str, info: dict) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(IR_DTYPES[info["dtype"]]), shape=ir.Shape(info["shape"]))


def _layer_weight_names(cfg: DecoderConfig, layer: int) -> list[str]:
    return list(layer_tensor_shapes(cfg, layer))


def checked_weight(source: ModelSource, name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                   allow_nonfinite: bool = False) -> torch.Tensor:
    """``t`` cast to ``dtype`` (the graph's), if it can stand for the decoder weight ``name``:
    floating point (an integer or bool tensor cast to the profile's dtype would export silently
    wrong numbers), the shape the architecture needs (checked here, where every tensor is bound), and finite unless
    ``allow_nonfinite``. Finite as stored in the graph: an fp32 value beyond float16's range
    becomes inf in the cast, however finite the checkpoint's copy."""
    where = source.path or source.name
    if not t.is_floating_point():
        raise ExportError(f"{where}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; decoder "
                          f"weights must be floating point (an integer tensor is not cast)")
    if tuple(t.shape) != tuple(shape):
        raise ExportError(f"{where}: tensor {name!r} has shape {list(t.shape)}, the architecture needs {list(shape)}")
    cast = t.to(dtype)
    if not allow_nonfinite and not _all_finite(cast):
        bad = int((~torch.isfinite(cast)).sum())
        own = int((~torch.isfinite(t)).sum()) if bad else 0
        if own:
            raise ExportError(f"{where}: tensor {name!r} holds {own} NaN or infinite value(s) of {t.numel()}; "
                              f"--allow-nonfinite-weights exports it anyway")
        if bad:
            kind = str(dtype).removeprefix("torch.")
            raise ExportError(f"{where}: tensor {name!r} overflows {kind}: {bad} value(s) of {t.numel()} "
                              f"(largest magnitude {float(t.abs().max()):g}) exceed its range "
                              f"±{torch.finfo(dtype).max:g} and would be infinite in the graph; use a profile of "
                              f"a wider dtype (fp32, bf16), or --allow-nonfinite-weights exports it anyway")
    return cast


def _all_finite(t: torch.Tensor) -> bool:
    # One pass with no temporary (a hundredth of isfinite's time): NaN propagates into both the
    # minimum and the maximum, an infinity is one of them.
    if t.numel() == 0:
        return True
    low, high = torch.aminmax(t)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))


def build_pack_model(source: ModelSource, spec: StackSpec, dtype: str, batch: int | str,
                     allow_nonfinite: bool = False) -> tuple[ir.Model, int]:
    """The pack's ONNX model (in memory, written op by op: kvplan/export/emit.py) and its weight bytes."""
    cfg = source.config
    shapes = tensor_shapes(cfg)
    tdtype = TORCH_DTYPES[dtype]
    contract = io_contract(cfg, spec, batch, dtype)
    inputs = {name: _graph_value(name, info) for name, info in contract["inputs"].items()}
    e = emit.Emitter(list(inputs.values()), dtype, emit.INPLACE_OPSET if spec.kv_io == "inplace" else OPSET)
    cos, sin = emit.rotary(e, cfg, inputs["position_ids"])
    x, outputs = inputs["hidden_in"], {}
    groups = [_layer_weight_names(cfg, i) for i in spec.layers] + ([["norm.weight"]] if spec.final_norm else [])
    reader = _LayerReader(groups, lambda name, t: _bound(source, name, t, shapes[name], tdtype, allow_nonfinite),
                          source.read_tensors)
    weight_bytes = sum(math.prod(shapes[n]) for g in groups for n in g) * torch.finfo(tdtype).bits // 8

    def bind(group: int, name: str) -> ir.Value:
        stored = name + ".T" if name.endswith("_proj.weight") else name
        shape = shapes[name][::-1] if stored != name else shapes[name]
        tensor = ir.LazyTensor(lambda: reader.tensor(group, name), IR_DTYPES[dtype], ir.Shape(list(shape)), name=stored)
        return e.initializer(stored, tensor)

    for group, i in enumerate(spec.layers):
        weights = {name.split(".", 2)[2]: bind(group, name) for name in groups[group]}
        x, k, v = emit.layer(e, cfg, spec, batch, i, x, weights, inputs["attention_mask"], cos, sin,
                             inputs[f"past_key_in{i}"], inputs[f"past_value_in{i}"], inputs.get("write_indices"))
        key_name, value_name = output_names(StackSpec(i, i + 1, False, spec.kv_format, spec.kv_io, spec.cache_len))[1:]
        outputs[key_name], outputs[value_name] = k, v
    if spec.final_norm:
        x = emit.final_norm(e, cfg, x, bind(len(groups) - 1, "norm.weight"))
    outputs = {"hidden_out": x, **outputs}
    for name, value in outputs.items():
        if value in e.graph.outputs or value.is_graph_input():
            # One tensor is two outputs (or an input passed through): an Identity gives each its name.
            e.scope = ""
            value = e.op("Identity", value)
        info = contract["outputs"][name]
        value.name = name
        value.shape, value.type = ir.Shape(info["shape"]), ir.TensorType(IR_DTYPES[info["dtype"]])
        e.graph.outputs.append(value)
    model = ir.Model(e.graph, ir_version=10, producer_name="kvplan")
    _check_linears(model, {v.name.removesuffix(".T") for v in e.graph.initializers.values()},
                   where=source.path or source.name)
    return model, weight_bytes


def _bound(source: ModelSource, name: str, t: torch.Tensor, shape, dtype, allow_nonfinite: bool) -> ir.Tensor:
    """A checkpoint tensor as the graph stores it: checked, cast, and transposed for a linear
    (MatMul multiplies by W^T [in, out]: transposed once here, not by a node of the graph)."""
    t = checked_weight(source, name, t, shape, dtype, allow_nonfinite)
    if name.endswith("_proj.weight"):
        return torch_to_ir(t.t().contiguous(), name + ".T")
    return torch_to_ir(t, name)


class _LayerReader:
    """The pack's weights, one group (a layer, the final norm) at a time, read when the file writer
    first asks for one of the group's tensors, and the next group read meanwhile on a second
    thread: reading, casting and transposing layer i + 1 overlaps writing layer i, and at most two
    layers' weights are in memory, however deep the pack."""

    def __init__(self, groups: list[list[str]], bound, read):
        self.groups, self.bound, self.read = groups, bound, read
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvplan-export")
        self.futures: dict[int, concurrent.futures.Future] = {}

    def _load(self, group: int) -> dict:
        return {name: self.bound(name, t) for name, t in self.read(self.groups[group]).items()}

    def _future(self, group: int):
        if group not in self.futures and group < len(self.groups):
            self.futures[group] = self.pool.submit(self._load, group)
        return self.futures.get(group)

    def tensor(self, group: int, name: str):
        for old in [g for g in self.futures if g < group]:
            del self.futures[old]           # written: its arrays go with it
        done = self._future(group).result()
        self._future(group + 1)
        return done[name]


def _check_linears(model: ir.Model, weights: set[str], where) -> None:
    """Every linear weight the pack binds is computed by exactly one MatMul marked with its name
    (the quantize stage finds the linears by these marks)."""
    marks: dict[str, int] = {}
    for node in model.graph:
        name = node.metadata_props.get(LINEAR_MARK)
        if name is not None:
            marks[name] = marks.get(name, 0) + 1
    linears = {n for n in weights if n.endswith("_proj.weight")}
    wrong = sorted(n for n in linears | set(marks) if marks.get(n) != 1 or n not in linears)
    if wrong:
        raise ExportError(f"{where}: tensor {wrong[0]!r}: the exported graph computes it in "
                          f"{marks.get(wrong[0], 0)} marked MatMul node(s), not exactly one")


def export_pack(source: ModelSource, spec: StackSpec, dtype: str, batch: int | str, path: Path,
                allow_nonfinite: bool = False) -> PackExport:
    """Export one pack to ``path`` (written to a temporary name, then renamed into place).

    ``batch``: a static batch size, or "B" for a dynamic batch axis (Export.batch_dim).
    """
    t0 = time.perf_counter()
    model, weight_bytes = build_pack_model(source, spec, dtype, batch, allow_nonfinite)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    with atomic_directory(path, companions=(path.name + ".data",)) as tmp:
        if external:
            ir.save(model, tmp / path.name, external_data=path.name + ".data")
        else:
            save_streamed(model, tmp / path.name)
        del model
    return PackExport(spec, path, external, weight_bytes, time.perf_counter() - t0)


def torch_to_ir(t: torch.Tensor, name: str) -> ir.Tensor:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy(), name=name)


def save_streamed(model: ir.Model, path: Path) -> None:
    """Save with the weights written one at a time from their own buffers (see
    kvplan.fileio.write_streamed): a whole-model serialization holds two more copies of them."""
    weights = list(model.graph.initializers.values())
    model.graph.initializers.clear()
    head = ir.serde.serialize_model(model)
    entries = [ir_entry(value) for value in weights]
    with open(path, "wb") as f:
        write_streamed(head, lambda: iter(entries), f)


__all__ = ["export_pack", "pack_specs", "io_contract", "input_names", "output_names", "example_inputs",
           "causal_mask", "kv_shape", "TORCH_DTYPES", "pack_file_names", "PackExport", "ExportError"]
