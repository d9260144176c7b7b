"""A built target's plans through Polygraphy's TrtRunner: embed.plan -> decoder plans -> head.plan.

Needs a GPU this TensorRT can run on (kvplan.validate.runners.make_tensorrt says why not
otherwise). Each step runs on the optimization profile a runtime would pick for it (the
narrowest whose ranges hold it). Polygraphy copies every feed to the device and every output
back, so the cache crosses the bus each step: this path shows the engines' tokens, not their
speed; a deployment keeps the cache on the device.
"""
from __future__ import annotations

import numpy as np

from kvplan.export.exporter import causal_mask
from kvplan.runtime.cache import KvCache
from kvplan.runtime.onnx import TORCH
from kvplan.validate.runners import make_tensorrt
from kvplan.validate.task import TrtStack, tightest_profile


class TensorRtModel:
    def __init__(self, plans: list, embed_plan, head_plan, specs, profile, backend, cfg):
        self.cfg, self.profile, self.specs = cfg, profile, specs
        self.runners = []
        for path in [*plans, embed_plan, head_plan]:
            runner, why = make_tensorrt(path, backend, None, 0, specs[0])
            if runner is None:
                raise RuntimeError(why)
            runner.activate()
            self.runners.append(runner)
        self.stack = TrtStack(self.runners[:len(plans)], specs, profile)
        self.embed_runner, self.head_runner = self.runners[-2:]
        self.active = {}

    def _on_profile(self, runner, n: int, last: int) -> None:
        index = tightest_profile(self.profile.shapes, n, last)
        if self.active.get(id(runner)) != index:
            runner.set_profile(index)
            self.active[id(runner)] = index

    def new_cache(self, capacity: int, batch: int = 1) -> KvCache:
        # The stack carries the cache in the canonical concat layout on the host (cache_io converts it).
        cfg = self.cfg
        return KvCache.empty("concat", 0, cfg.num_layers, batch, cfg.num_kv_heads, cfg.head_dim, 0,
                             np.dtype(str(TORCH[self.profile.dtype]).removeprefix("torch.")))

    def embed(self, ids: np.ndarray) -> np.ndarray:
        self._on_profile(self.embed_runner, ids.shape[1], 0)
        return np.asarray(self.embed_runner.infer({"input_ids": ids.astype(np.int64)})["hidden_in"])

    def head(self, hidden: np.ndarray) -> dict:
        self._on_profile(self.head_runner, hidden.shape[1], 0)
        return {k: np.asarray(v) for k, v in self.head_runner.infer({"hidden_out": hidden}).items()}

    def decode(self, hidden: np.ndarray, cache: KvCache) -> np.ndarray:
        n, last = hidden.shape[1], cache.length
        mask = causal_mask(hidden.shape[0], n, last, TORCH[self.profile.dtype], window=self.cfg.sliding_window)
        pos = np.arange(last, last + n, dtype=np.int64)[None]
        out, cache.tensors = self.stack.step(hidden, mask.numpy(), pos, cache.tensors)
        cache.traffic.written += sum(t.nbytes for t in cache.tensors)
        cache.advance(n)
        return out

    def close(self) -> None:
        for runner in self.runners:
            runner.deactivate()
