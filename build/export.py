"""Export: a decoder stack (one pack of layers) to ONNX with a flattened KV cache.

Exporter choice: torch.export-based (``dynamo=True``). It is the maintained
exporter (the TorchScript one is deprecated), it emits opset 23 directly, so the
fused ops the surgery stage writes (RMSNormalization, RotaryEmbedding, Attention)
need no version conversion afterwards, and its graphs carry weights as
initializers with no Constant-node clutter. Its one quirk: it names dynamic axes
itself (``s53``, ``s53 + s93``), so we rename them to the contract's N, lastSum
and sumN after export.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import onnxscript.optimizer
import torch

from .config import DecoderConfig
from .decoder import StackSpec, build_stack, pack_specs
from .models import ModelSource

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
OPSET = 23
# protobuf refuses messages over 2 GiB; stay clearly below it.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


class ExportError(RuntimeError):
    pass


def input_names(spec: StackSpec) -> list[str]:
    names = ["hidden_in", "attention_mask", "position_ids"]
    for i in spec.layers:
        names += [f"past_key_in{i}", f"past_value_in{i}"]
    return names


def output_names(spec: StackSpec) -> list[str]:
    names = ["hidden_out"]
    for i in spec.layers:
        names += [f"past_key{i}", f"past_value{i}"]
    return names


def kv_shape(cfg: DecoderConfig, spec: StackSpec, batch: int, length: int | str) -> list:
    if spec.kv_format == 1:
        return [batch, length, cfg.num_kv_heads, cfg.head_dim]
    return [batch, cfg.num_kv_heads, length, cfg.head_dim]


def io_contract(cfg: DecoderConfig, spec: StackSpec, batch: int, dtype: str) -> dict[str, dict]:
    """Name -> {shape, dtype} of every input and output, with symbolic axes as strings."""
    io = {
        "inputs": {
            "hidden_in": {"shape": [batch, "N", cfg.hidden_size], "dtype": dtype},
            "attention_mask": {"shape": [batch, 1, "N", "sumN"], "dtype": dtype},
            "position_ids": {"shape": [batch, "N"], "dtype": "int64"},
        },
        "outputs": {"hidden_out": {"shape": [batch, "N", cfg.hidden_size], "dtype": dtype}},
    }
    for i in spec.layers:
        for kind in ("key", "value"):
            io["inputs"][f"past_{kind}_in{i}"] = {"shape": kv_shape(cfg, spec, batch, "lastSum"), "dtype": dtype}
            io["outputs"][f"past_{kind}{i}"] = {"shape": kv_shape(cfg, spec, batch, "sumN"), "dtype": dtype}
    return io


def example_inputs(cfg: DecoderConfig, spec: StackSpec, batch: int, dtype: torch.dtype,
                   n: int, last: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs at (N, lastSum), causal mask; distinct sizes so tracing keeps the axes apart."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, n, cfg.hidden_size, generator=g).to(dtype)
    mask = causal_mask(batch, n, last, dtype)
    pos = torch.arange(last, last + n, dtype=torch.int64).expand(batch, n).contiguous()
    past = []
    for _ in spec.layers:
        for _ in range(2):
            past.append(torch.randn(kv_shape(cfg, spec, batch, last), generator=g).to(dtype))
    return (hidden, mask, pos, *past)


def causal_mask(batch: int, n: int, last: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, N, lastSum+N]: 0 where a query may attend, finfo.min elsewhere."""
    q = torch.arange(last, last + n)[:, None]
    k = torch.arange(last + n)[None, :]
    mask = torch.zeros(n, last + n, dtype=dtype)
    mask.masked_fill_(k > q, torch.finfo(dtype).min)
    return mask.expand(batch, 1, n, last + n).contiguous()


def _rename_axes(program, spec: StackSpec) -> None:
    """Replace the exporter's symbol names with N / lastSum / sumN on the graph's I/O."""
    import onnx_ir as ir

    graph = program.model.graph
    by_name = {v.name: v for v in graph.inputs}
    seq_axis = 2 if spec.kv_format == 0 else 1
    # Each past input gets its own symbol from the exporter (nothing in the graph
    # ties them together); they are all lastSum by contract.
    symbols = {str(v.shape[seq_axis]): "lastSum" for v in graph.inputs if v.name.startswith("past_")}
    symbols[str(by_name["hidden_in"].shape[1])] = "N"
    symbols[str(by_name["attention_mask"].shape[3])] = "sumN"

    def renamed(shape):
        dims = []
        for d in shape:
            if isinstance(d, ir.SymbolicDim):
                text = str(d)
                name = symbols.get(text)
                if name is None and "+" in text:
                    # "sA + sB" where {sA, sB} = {N, lastSum}: the concatenated length.
                    parts = {symbols.get(p.strip()) for p in text.split("+")}
                    name = "sumN" if parts == {"N", "lastSum"} else None
                dims.append(name if name is not None else d)
            else:
                dims.append(d)
        return ir.Shape(dims)

    for value in list(graph.inputs) + list(graph.outputs):
        value.shape = renamed(value.shape)
    for node in graph:
        for value in node.outputs:
            if value.shape is not None:
                value.shape = renamed(value.shape)


@dataclass
class PackExport:
    spec: StackSpec
    path: Path
    external_data: bool
    weight_bytes: int
    seconds: float


def export_pack(source: ModelSource, spec: StackSpec, dtype: str, batch: int, path: Path,
                log=print) -> PackExport:
    """Export one pack to ``path`` (written to a temporary name, then renamed into place)."""
    cfg = source.config
    tdtype = TORCH_DTYPES[dtype]
    t0 = time.perf_counter()
    names = [n for n in _stack_tensor_names(cfg, spec)]
    stack = build_stack(cfg, spec, source.read_tensors(names), tdtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in stack.parameters())
    args = example_inputs(cfg, spec, batch, tdtype, n=3, last=5)
    dyn = torch.export.Dim.DYNAMIC
    seq_axis = 2 if spec.kv_format == 0 else 1
    dynamic_shapes = ({1: dyn}, {2: dyn, 3: dyn}, {1: dyn}, ({seq_axis: dyn},) * (2 * len(spec.layers)))
    with warnings.catch_warnings(), _quiet_exporter():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            stack, args, f=None, dynamo=True, opset_version=OPSET,
            input_names=input_names(spec), output_names=output_names(spec),
            dynamic_shapes=dynamic_shapes, optimize=False, verbose=False)
        if program is None:
            raise ExportError(f"layers {spec.first_layer}..{spec.last_layer - 1}: the exporter returned no program")
        # The exporter's own optimize step would also fuse RMSNorm and RoPE (without
        # the checks and reports of our surgery stage); we want the plain graph
        # here, so run only constant folding and cleanup.
        onnxscript.optimizer.optimize_ir(program.model)
    _rename_axes(program, spec)
    program.model.producer_name = "kvplan"
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        program.save(str(tmp / path.name), external_data=external)
        del program, stack
        # Data file first: a graph never lands pointing at a data file that is missing.
        data = tmp / (path.name + ".data")
        if data.exists():
            os.replace(data, path.parent / data.name)
        elif (path.parent / (path.name + ".data")).exists():
            (path.parent / (path.name + ".data")).unlink()
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PackExport(spec, path, external, weight_bytes, time.perf_counter() - t0)


def _stack_tensor_names(cfg: DecoderConfig, spec: StackSpec) -> list[str]:
    from .decoder import DecoderStack
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


def pack_file_names(n_packs: int, stem: str = "decoder", suffix: str = ".onnx") -> list[str]:
    """decoder.onnx for one pack; decoder.pack0.onnx, decoder.pack1.onnx, ... otherwise."""
    if n_packs == 1:
        return [f"{stem}{suffix}"]
    return [f"{stem}.pack{i}{suffix}" for i in range(n_packs)]


__all__ = ["export_pack", "pack_specs", "io_contract", "input_names", "output_names", "example_inputs",
           "causal_mask", "kv_shape", "TORCH_DTYPES", "pack_file_names", "PackExport", "ExportError"]
