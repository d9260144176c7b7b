"""Export: a decoder stack (one pack of layers) to ONNX with a flattened KV cache.

Exporter choice: torch.export-based (``dynamo=True``). It is the maintained
exporter (the TorchScript one is deprecated), it emits opset 23 directly, so the
fused ops the surgery stage writes (RMSNormalization, RotaryEmbedding, Attention)
need no version conversion afterwards, and after constant folding its graphs
carry weights as initializers with no Constant-node clutter. It traces slowly
(seconds per layer), so we trace one layer and stitch copies (kvplan/export/stitch.py),
and we name the graph's dynamic axes N, lastSum and sumN ourselves instead of the
tracer's private symbols.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

from kvplan.config import DecoderConfig
from kvplan.decoder import DecoderStack, StackSpec, pack_specs
from kvplan.errors import ExportError
from kvplan.export.stitch import LINEAR_MARK, Stitcher, finish, torch_to_ir, trace_pieces
from kvplan.export.trace_cache import TraceCache
from kvplan.fileio import atomic_directory, write_streamed
from kvplan.lazy import lazy_import
from kvplan.models import ModelSource
from kvplan.models.presets import tensor_shapes
from kvplan.stack import input_names, io_contract, kv_shape, output_names, pack_file_names  # noqa: F401

onnx = lazy_import("onnx")
ir = lazy_import("onnx_ir")
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
    prefix = f"layers.{layer}."
    return [n for n in _stack_tensor_names(cfg, StackSpec(layer, layer + 1, False)) if n.startswith(prefix)]


def checked_weight(source: ModelSource, name: str, t: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype,
                   allow_nonfinite: bool = False) -> torch.Tensor:
    """``t`` cast to ``dtype`` (the graph's), if it can stand for the decoder weight ``name``:
    floating point (an integer or bool tensor cast to the profile's dtype would export silently
    wrong numbers), the shape the architecture needs (checked here, where every tensor is bound,
    so a warm trace cache that skips the trace cannot skip it), and finite unless
    ``allow_nonfinite``. Finite as stored in the graph: an fp32 value beyond float16's range
    becomes inf in the cast, however finite the checkpoint's copy."""
    where = source.path or source.name
    if not t.is_floating_point():
        raise ExportError(f"{where}: tensor {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; decoder "
                          f"weights must be floating point (an integer tensor is not cast)")
    if tuple(t.shape) != tuple(shape):
        raise ExportError(f"{where}: tensor {name!r} has shape {list(t.shape)}, the architecture needs {list(shape)}")
    cast = t.to(dtype)
    if not allow_nonfinite:
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


def build_pack_model(source: ModelSource, spec: StackSpec, dtype: str, batch: int | str,
                     trace_cache: TraceCache | None = None, log=print,
                     allow_nonfinite: bool = False) -> tuple[ir.Model, int]:
    """The pack's ONNX model (in memory) and its weight bytes."""
    cfg = source.config
    shapes = tensor_shapes(cfg)
    tdtype = TORCH_DTYPES[dtype]
    t0 = time.perf_counter()
    hits, stores = (len(trace_cache.hits), len(trace_cache.stored)) if trace_cache else (0, 0)
    pieces = trace_pieces(cfg, spec, tdtype, batch, lambda: {
        n.split(".", 2)[2]: checked_weight(source, n, t, shapes[n], tdtype, allow_nonfinite)
        for n, t in source.read_tensors(_layer_weight_names(cfg, spec.first_layer)).items()},
        cache=trace_cache, log=log)
    if trace_cache is not None:
        loaded, stored = trace_cache.hits[hits:], trace_cache.stored[stores:]
        how = (f"traced in {time.perf_counter() - t0:.1f} s and stored" if stored else
               "loaded from the trace cache" if loaded else "reused from this process")
        log(f"[export] pieces {', '.join(pieces)}: {how} ({trace_cache.directory})")
    contract = io_contract(cfg, spec, batch, dtype)
    inputs = {name: _graph_value(name, info) for name, info in contract["inputs"].items()}
    st = Stitcher(list(inputs.values()))
    cos, sin = st.add(pieces["rotary"], "rotary/", [inputs["position_ids"]])
    x, outputs, weight_bytes = inputs["hidden_in"], {}, 0
    extra = [inputs["write_indices"]] if spec.kv_io == "inplace" else []
    for i in spec.layers:
        tensors = source.read_tensors(_layer_weight_names(cfg, i))
        # One layer's weights converted at a time: the source's copy of a layer is
        # dropped before the next one is read.
        bound = {}
        for name, t in tensors.items():
            t = checked_weight(source, name, t, shapes[name], tdtype, allow_nonfinite)
            weight_bytes += t.numel() * t.element_size()
            bound["layer." + name.split(".", 2)[2]] = (name, torch_to_ir(t, name))
        del tensors
        x, k, v = st.add(pieces["layer"], f"layers.{i}/", [x, inputs["attention_mask"], cos, sin,
                                                            inputs[f"past_key_in{i}"], inputs[f"past_value_in{i}"],
                                                            *extra],
                         bind=bound.__getitem__)
        key_name, value_name = output_names(StackSpec(i, i + 1, False, spec.kv_format, spec.kv_io, spec.cache_len))[1:]
        outputs[key_name], outputs[value_name] = k, v
    if spec.final_norm:
        (norm_weight,) = source.read_tensors(["norm.weight"]).values()
        norm_weight = checked_weight(source, "norm.weight", norm_weight, shapes["norm.weight"], tdtype,
                                     allow_nonfinite)
        weight_bytes += norm_weight.numel() * norm_weight.element_size()
        (x,) = st.add(pieces["norm"], "norm/", [x], bind=lambda _: ("norm.weight", torch_to_ir(norm_weight, "norm.weight")))
    outputs = {"hidden_out": x, **outputs}
    model = st.model(outputs)
    for name, info in contract["outputs"].items():
        value = outputs[name]
        value.shape, value.type = ir.Shape(info["shape"]), ir.TensorType(IR_DTYPES[info["dtype"]])
    finish(model, st.weight_names)
    _check_linears(model, st.weight_names, where=source.path or source.name)
    return model, weight_bytes


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
                log=print, trace_cache: TraceCache | None = None, allow_nonfinite: bool = False) -> PackExport:
    """Export one pack to ``path`` (written to a temporary name, then renamed into place).

    ``batch``: a static batch size, or "B" for a dynamic batch axis (Export.batch_dim).

    ``trace_cache``: where traced pieces are looked up and stored (build/trace_cache.py); None
    traces (once per process) without one.
    """
    t0 = time.perf_counter()
    notes: list[str] = []       # said after the exporter's stdout is ours again
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        model, weight_bytes = build_pack_model(source, spec, dtype, batch, trace_cache, notes.append, allow_nonfinite)
    for note in notes if log else ():
        log(note)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    with atomic_directory(path, companions=(path.name + ".data",)) as tmp:
        if external:
            ir.save(model, tmp / path.name, external_data=path.name + ".data")
        else:
            save_streamed(model, tmp / path.name)
        del model
    return PackExport(spec, path, external, weight_bytes, time.perf_counter() - t0)


def save_streamed(model: ir.Model, path: Path) -> None:
    """Save with the weights serialized one at a time (see kvplan.fileio.write_streamed): a
    whole-model serialization holds two more copies of them."""
    weights = list(model.graph.initializers.values())
    model.graph.initializers.clear()
    head = ir.serde.serialize_model(model)

    def tensors():
        for value in weights:
            proto = onnx.TensorProto()
            ir.serde.serialize_tensor_into(proto, value.const_value)
            proto.name = value.name
            yield proto
    with open(path, "wb") as f:
        write_streamed(head, tensors, f)


def _stack_tensor_names(cfg: DecoderConfig, spec: StackSpec) -> list[str]:
    with torch.device("meta"):
        stack = DecoderStack(cfg, spec)
    return list(stack.state_dict())


@contextlib.contextmanager
def _quiet_exporter():
    """The exporter prints its progress banners to stdout; keep our CLI output readable."""
    buf = io.StringIO()
    level = logging.getLogger("torch.onnx").level
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except Exception:
        text = buf.getvalue().strip()
        if text:
            print(text)
        raise
    finally:
        logging.getLogger("torch.onnx").setLevel(level)


__all__ = ["export_pack", "pack_specs", "io_contract", "input_names", "output_names", "example_inputs",
           "causal_mask", "kv_shape", "TORCH_DTYPES", "pack_file_names", "PackExport", "ExportError"]
