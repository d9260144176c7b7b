"""Polygraphy runners for each stage: the PyTorch reference, ONNX Runtime, TensorRT.

A runner that cannot run here is not dropped silently: ``make_*`` return
``(runner, None)`` or ``(None, why)`` and the report lists the why.
"""
from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import polygraphy.config
from polygraphy.backend.base import BaseRunner
from polygraphy.backend.common import BytesFromPath
from polygraphy.backend.onnxrt import OnnxrtRunner
from polygraphy.backend.trt import EngineFromBytes, TrtRunner
from polygraphy.common import TensorMetadata

from kvplan.export.exporter import TORCH_DTYPES, output_names
from kvplan.lazy import lazy_import
from kvplan.runtime.ort_session import session as onnx_session
from kvplan.trt.backend import version_tuple
from kvplan.validate.points import own_columns, to_feed_value, to_kv_format
from kvplan.validate.reference import slice_decoder

ort = lazy_import("onnxruntime")
polygraphy = lazy_import("polygraphy")
torch = lazy_import("torch")

REFERENCE, EXPORT, FUSED, TENSORRT = "pytorch", "onnxrt-export", "onnxrt-fused", "tensorrt"


@dataclass(frozen=True)
class Runner:
    """One entry of the table every validation loop, pair and report row is read from."""
    name: str
    runs: str                        # "reference", "graph" (ONNX Runtime) or "engine" (TensorRT)
    stage: str | None                # the manifest stage whose artifacts it runs
    compared_with: tuple[str, ...]   # the earlier runners each of its outputs is compared against


# In run order: a runner is compared with runners before it, so their outputs are on disk when it runs.
RUNNERS = (Runner(REFERENCE, "reference", None, ()),
           Runner(EXPORT, "graph", "export", (REFERENCE,)),
           Runner(FUSED, "graph", "surgery", (REFERENCE, EXPORT)),
           Runner(TENSORRT, "engine", "engines", (FUSED, REFERENCE)))
NAMES = tuple(r.name for r in RUNNERS)
GRAPH_RUNNERS = tuple(r.name for r in RUNNERS if r.runs == "graph")
# (reference, candidate) pairs compared on every output of every point, in report order.
PAIRS = tuple((earlier, r.name) for r in RUNNERS for earlier in r.compared_with)
PAIR_ORDER = {f"{a} vs {b}": i for i, (a, b) in enumerate(PAIRS)}


class ReferenceRunner(BaseRunner):
    """transformers' own model with its own DynamicCache, fed the export contract's feed dict.

    Independent of kvplan's decoder module and export wrapper: only the contract's names
    and layouts are shared.
    """

    def __init__(self, ref, spec, contract: dict, name: str = REFERENCE, log=None, out_dtype: torch.dtype | None = None):
        """``out_dtype``: outputs rounded to it once at the end (a reference computing in float32 for
        an fp16 graph returns what the graph returns: fp16 tensors)."""
        super().__init__(name=name, prefix="pytorch-runner")
        self.ref, self.spec, self.contract, self.log, self.out_dtype = ref, spec, contract, log, out_dtype
        self.decoder = slice_decoder(ref.decoder, spec.first_layer, spec.last_layer, spec.final_norm)

    def get_input_metadata_impl(self):
        meta = TensorMetadata()
        for name, info in self.contract["inputs"].items():
            shape = [d if isinstance(d, int) else None for d in info["shape"]]
            meta.add(name, TORCH_DTYPES.get(info["dtype"], torch.int64), shape)
        return meta

    def _past(self, feed, kind: str, layer: int) -> torch.Tensor:
        value = feed[f"past_{kind}_in{layer}"]
        t = value if isinstance(value, torch.Tensor) else torch.from_numpy(value)
        return to_kv_format(t, self.spec.kv_format)       # format 1 -> 0 is the same transpose

    def infer_impl(self, feed_dict):
        start = time.perf_counter()
        as_torch = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(v)) for k, v in feed_dict.items()}
        lasts = self._row_lasts(as_torch)
        values = self._rows(as_torch, lasts) if len(set(lasts)) > 1 else self._step(as_torch)
        self.inference_time = time.perf_counter() - start
        if self.log:   # the slow runner on CPU at large shapes: show progress per point
            n, total = feed_dict["attention_mask"].shape[-2:]
            self.log(f"[validate]   {self.name}: layers {self.spec.first_layer}..{self.spec.last_layer - 1} "
                     f"N={n} lastSum={total - n}{'' if len(lasts) == 1 else f' B={len(lasts)}'} "
                     f"in {self.inference_time:.1f} s")
        if self.out_dtype is not None:
            values = [v.to(self.out_dtype) for v in values]
        return OrderedDict((n, to_feed_value(v)) for n, v in zip(output_names(self.spec), values))

    def _row_lasts(self, feed) -> list[int]:
        """Each batch row's own number of valid past rows: where it writes (in-place), else where its
        positions start (the contract for a batch of rows of different lengths: the past tensor has
        the longest's rows, a shorter row's extra ones are masked out)."""
        if self.spec.kv_io == "inplace":
            return [int(i) for i in feed["write_indices"]]
        return [int(p) for p in feed["position_ids"][:, 0]]

    def _rows(self, feed, lasts: list[int]) -> list[torch.Tensor]:
        """Rows of different lengths, each computed on its own valid past alone (no padding), then
        assembled into the batch's output tensors: concat outputs carry the fed past rows (a
        pass-through, by contract) and then the row's new ones; delta and in-place outputs are
        the rows' own."""
        seq = 2 if self.spec.kv_format == 0 else 1
        n = feed["hidden_in"].shape[1]
        total = feed[f"past_key_in{self.spec.first_layer}"].shape[seq]
        rows = []
        for b, own in enumerate(lasts):
            row = {k: v[b:b + 1] for k, v in feed.items()}
            if self.spec.kv_io != "inplace":
                mask = row["attention_mask"]
                if own > total or not bool((mask[..., own:total] <= torch.finfo(mask.dtype).min / 2).all()):
                    raise ValueError(f"batch row {b}: its positions start at {own}, but the mask does not mask "
                                     f"out past rows {own}..{total - 1}")
                row["attention_mask"] = own_columns(mask, own, total)
                row.update({k: v.narrow(seq, 0, own) for k, v in row.items() if k.startswith("past_")})
            rows.append(self._step(row))
        out = [torch.cat([r[0] for r in rows])]
        names = [f"past_{kind}_in{i}" for i in self.spec.layers for kind in ("key", "value")]
        for j, name in enumerate(names, start=1):
            if self.spec.kv_io == "concat":
                parts = [torch.cat([feed[name][b:b + 1].to(r[j].dtype), r[j].narrow(seq, own, n)], dim=seq)
                         for b, (own, r) in enumerate(zip(lasts, rows))]
            else:
                parts = [r[j] for r in rows]
            out.append(torch.cat(parts))
        return out

    def _step(self, as_torch) -> list[torch.Tensor]:
        """hidden_out and the KV outputs (in the pack's kv format) for a batch whose rows share one lastSum."""
        feed_dict = as_torch
        buffers = None
        if self.spec.kv_io == "inplace":
            # Back to the cache the buffer holds (its first lastSum rows) and the step's own mask.
            n, last = as_torch["hidden_in"].shape[1], int(as_torch["write_indices"][0])
            if not bool((as_torch["write_indices"] == last).all()):
                raise ValueError("the reference runner takes one lastSum for the whole batch")
            buffers = {k: v for k, v in as_torch.items() if k.startswith("past_")}
            as_torch = {**as_torch, "attention_mask": as_torch["attention_mask"][..., :last + n],
                        **{k: v[:, :, :last] for k, v in buffers.items()}}
            feed_dict = as_torch
        cache = self.ref.new_cache()
        # Only the pack's slots are filled: with a 4D mask and explicit positions transformers never
        # asks the cache for the length of a layer the pack does not run.
        if self._past(feed_dict, "key", self.spec.first_layer).shape[2]:
            for i in self.spec.layers:
                cache.update(self._past(feed_dict, "key", i).to(self.ref.dtype),
                             self._past(feed_dict, "value", i).to(self.ref.dtype), i)
        with torch.no_grad():
            out = self.decoder(inputs_embeds=as_torch["hidden_in"].to(self.ref.dtype),
                               attention_mask=as_torch["attention_mask"].to(self.ref.dtype),
                               position_ids=as_torch["position_ids"], use_cache=True,
                               **{self.ref._cache_kw: cache})
        past = self.ref.cache_tensors(cache, self.spec.layers)
        if self.spec.kv_io == "delta":      # the graph outputs only the step's new rows
            n = as_torch["hidden_in"].shape[1]
            past = [t[:, :, t.shape[2] - n:] for t in past]
        elif buffers is not None:           # the buffer with the step's rows written, the rest as fed
            written = []
            for t, (kind, layer) in zip(past, ((k, i) for i in self.spec.layers for k in ("key", "value"))):
                buf = buffers[f"past_{kind}_in{layer}"].clone()
                buf[:, :, :t.shape[2]] = t.to(buf.dtype)
                written.append(buf)
            past = written
        return [out.last_hidden_state] + [to_kv_format(t, self.spec.kv_format) for t in past]


def make_onnxrt(path: Path, name: str):
    """ONNX Runtime (CPU) on ``path``. The session is created when the runner activates and freed
    when it deactivates, so only the running graph's weights are in memory; whether the graph can
    run here (bfloat16 cannot) shows at activation: ``onnxrt_why_not`` words it."""
    # kv_io = "inplace": ONNX Runtime warns on every TensorScatter that it copies the buffer.
    ort.set_default_logger_severity(3)
    return OnnxrtRunner(lambda: onnx_session(path), name=name), None


def onnxrt_why_not(path: Path, error: Exception) -> str:
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return f"ONNX Runtime {ort.__version__} (CPU) cannot run {path.name}: {first}"


# Polygraphy's TrtRunner binds an output the engine aliases to an input (get_aliased_input_tensor,
# kv_io = "inplace") to that input's device buffer from this release on.
POLYGRAPHY_ALIASING = (0, 50, 3)


def make_tensorrt(plan: Path | None, backend, backend_error: str | None, profile_index: int, spec=None,
                  polygraphy_version: str = polygraphy.__version__):
    """Polygraphy's TrtRunner on the plan, when this machine can run it (GPU + a backend that supports it)."""
    if plan is None:
        return None, "no engine in this target (built with --stop-after export/surgery)"
    if spec is not None and spec.kv_io == "inplace" and version_tuple(polygraphy_version) < POLYGRAPHY_ALIASING:
        return None, (f"kv_io = inplace: Polygraphy {polygraphy_version} binds every output to a buffer of its own; "
                      f"in-place outputs share their inputs' memory, which Polygraphy binds from 0.50.3 on")
    if backend is None:
        return None, backend_error or "no TensorRT backend importable"
    if not backend.can_run:
        return None, f"{backend.name} {backend.version} cannot run engines here: {backend.why_not_run}"
    if backend.is_rtx:
        use_rtx()
    return TrtRunner(EngineFromBytes(BytesFromPath(str(plan))), name=TENSORRT,
                     optimization_profile=profile_index), None


def use_rtx() -> None:
    """Polygraphy picks tensorrt_rtx over tensorrt from this flag (read at import; set both)."""
    os.environ["POLYGRAPHY_USE_TENSORRT_RTX"] = "1"
    polygraphy.config.USE_TENSORRT_RTX = True
