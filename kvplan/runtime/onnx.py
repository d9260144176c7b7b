"""A built target's graphs in ONNX Runtime: embed.onnx -> the decoder's packs -> head.onnx.

The cache lives in a kvplan.runtime.cache.KvCache. kv_io = "inplace" binds each cache buffer as
both the graph's input and its output (ONNX Runtime's IO binding), so TensorScatter writes the new
rows into the buffer the next step reads; the other modes feed numpy arrays, which ONNX Runtime
reads where they lie when they are contiguous.

Sessions run at ONNX Runtime's default optimization level (its fp16 weight casts folded once:
several times faster per decode step than the basic level validation checks graphs at), unless
``fold_casts`` is False: a caller that runs a few steps (validation's whole-step check) then keeps
the weights once instead of as float32 copies (kvplan.runtime.ort_session says what each costs).
``int4_accuracy``: the level ONNX Runtime's int4 MatMulNBits computes at (0: the graph's
precision; 4: activations quantized to int8, faster).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvplan.export.exporter import causal_mask, output_names
from kvplan.lazy import lazy_import
from kvplan.runtime.cache import KvCache
from kvplan.runtime.ort_session import session_options

ort = lazy_import("onnxruntime")
torch = lazy_import("torch")

NP_DTYPES = {"float32": np.float32, "float16": np.float16}
TORCH = {"float32": torch.float32, "float16": torch.float16}


def open_session(path: Path, threads: int = 0, int4_accuracy: int = 0, fold_casts: bool = True) -> ort.InferenceSession:
    opts = session_options(threads, fold_casts=fold_casts, int4_accuracy=int4_accuracy)
    # The embedding, decoder and head sessions take turns, each with its own thread pool: threads
    # left spinning after a run keep the cores from the next session (SmolLM2-135M fp16 decode on 2
    # cores: 22 tokens/s spinning, 30 without).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


@dataclass
class Graphs:
    """The files a target's runtime drives: the decoder packs (with their specs), embed and head."""
    packs: list            # [(StackSpec, Path)]
    embed: Path
    head: Path


class OnnxModel:
    """Every session is opened up front (a bad graph fails here, not at the first step); ``release``
    closes some, and they open again when next used."""

    def __init__(self, graphs: Graphs, cfg, dtype: str, threads: int = 0, int4_accuracy: int = 0,
                 fold_casts: bool = True):
        if dtype not in NP_DTYPES:
            raise ValueError(f"ONNX Runtime's CPU provider runs no {dtype} graphs")
        self.cfg, self.dtype, self.np_dtype = cfg, dtype, NP_DTYPES[dtype]
        self.specs = [spec for spec, _ in graphs.packs]
        self._paths = {"decoder": [path for _, path in graphs.packs], "embed": graphs.embed, "head": graphs.head}
        self._options = (threads, int4_accuracy, fold_casts)
        self._sessions: dict = {}
        for part in self._paths:
            self._session(part)
        self.head_outputs = [o.name for o in self.head_session.get_outputs()]

    def _session(self, part: str):
        if part not in self._sessions:
            paths = self._paths[part]
            self._sessions[part] = ([open_session(p, *self._options) for p in paths] if isinstance(paths, list)
                                    else open_session(paths, *self._options))
        return self._sessions[part]

    @property
    def decoder(self) -> list:
        return self._session("decoder")

    @property
    def embed_session(self):
        return self._session("embed")

    @property
    def head_session(self):
        return self._session("head")

    def release(self, *parts: str) -> None:
        """Close the sessions of ``parts`` (``decoder``, ``embed``, ``head``): each holds its graph's weights."""
        for part in parts:
            self._sessions.pop(part, None)

    @property
    def spec(self):
        return self.specs[0]

    def new_cache(self, capacity: int, batch: int = 1) -> KvCache:
        spec, cfg = self.spec, self.cfg
        if spec.kv_io == "inplace":
            capacity = spec.cache_len
        return KvCache.empty(spec.kv_io, spec.kv_format, cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim,
                             capacity, self.np_dtype)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        return self.embed_session.run(None, {"input_ids": np.asarray(ids, dtype=np.int64)})[0]

    def head(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self.head_outputs, self.head_session.run(None, {"hidden_out": hidden})))

    def _mask(self, n: int, last: int, batch: int) -> np.ndarray:
        spec = self.spec
        length = spec.cache_len if spec.kv_io == "inplace" else None
        return causal_mask(batch, n, last, TORCH[self.dtype], length=length,
                           window=self.cfg.sliding_window).numpy()

    def decode(self, hidden: np.ndarray, cache: KvCache) -> np.ndarray:
        """One step of ``hidden`` [B, N, hidden] on top of ``cache`` (advanced by N); hidden_out."""
        batch, n = hidden.shape[:2]
        last = cache.length
        if cache.mode != "concat" and last + n > cache.capacity:
            raise ValueError(f"lastSum + N = {last + n} does not fit the cache's {cache.capacity} rows")
        mask, pos = self._mask(n, last, batch), np.arange(last, last + n, dtype=np.int64)[None].repeat(batch, 0)
        for spec, sess in zip(self.specs, self.decoder):
            feed = {"hidden_in": hidden, "attention_mask": mask, "position_ids": pos}
            if spec.kv_io == "inplace":
                hidden = self._bound_step(sess, spec, feed, cache, last, n)
                continue
            names = output_names(spec)
            for i in spec.layers:
                feed[f"past_key_in{i}"], feed[f"past_value_in{i}"] = cache.past(2 * i), cache.past(2 * i + 1)
            outs = sess.run(names, feed)
            hidden = outs[0]
            for k, i in enumerate(spec.layers):
                cache.take(2 * i, outs[1 + 2 * k], n)
                cache.take(2 * i + 1, outs[2 + 2 * k], n)
        cache.advance(n)
        return hidden

    def _bound_step(self, sess, spec, feed: dict, cache: KvCache, last: int, n: int) -> np.ndarray:
        binding = sess.io_binding()
        feed["write_indices"] = np.full((feed["hidden_in"].shape[0],), last, dtype=np.int64)
        for name, value in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        binding.bind_output("hidden_out")
        for i in spec.layers:
            for kind, name in enumerate(("key", "value")):
                buffer = _ortvalue(cache, 2 * i + kind)
                binding.bind_ortvalue_input(f"past_{name}_in{i}", buffer)
                binding.bind_ortvalue_output(f"past_{name}{i}", buffer)
        sess.run_with_iobinding(binding)
        for i in spec.layers:
            for kind in range(2):
                cache.take(2 * i + kind, cache.tensors[2 * i + kind], n)
        return binding.get_outputs()[0].numpy()


def _ortvalue(cache: KvCache, index: int) -> ort.OrtValue:
    """An OrtValue over the buffer's own memory (made once per buffer, then reused)."""
    if index not in cache.handles:
        cache.handles[index] = ort.OrtValue.ortvalue_from_numpy(cache.tensors[index])
    return cache.handles[index]
