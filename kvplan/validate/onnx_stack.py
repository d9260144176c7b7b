"""Drive exported packs as a deployment runtime would.

Chains packs (hidden_out of one is hidden_in of the next), carries the flattened
cache from step to step in the canonical layout (build/cache_io.py converts it at
each graph's boundary for the delta and inplace modes), and converts kv format 1 to
and from the canonical [B, kv_heads, S, head_dim] so callers compare against
transformers' layout. ``pack_feed``/``next_past`` are shared by every backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvplan import cache_io
from kvplan.lazy import lazy_import
from kvplan.runtime.ort_session import session
from kvplan.stack import StackSpec

ort = lazy_import("onnxruntime")


@dataclass
class Pack:
    spec: StackSpec
    path: Path


def _layout(t: np.ndarray, kv_format: int) -> np.ndarray:
    # [B, S, kv, D] <-> [B, kv, S, D]: the same transpose both ways.
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3)) if kv_format == 1 else t


def pack_feed(spec: StackSpec, hidden, mask, position_ids, past: list[np.ndarray]) -> dict[str, np.ndarray]:
    """Inputs of one pack; ``past`` is the whole stack's [k0, v0, k1, v1, ...] in kv format 0."""
    return cache_io.graph_feed(spec, hidden, mask, position_ids,
                               lambda i, kind: _layout(past[2 * i + kind], spec.kv_format))


def next_past(spec: StackSpec, kv_outputs: list[np.ndarray], past: list[np.ndarray], n: int) -> list[np.ndarray]:
    """This pack's layers' cache after a step of ``n`` tokens (kv format 0), from its KV outputs in graph order."""
    out = []
    for j, i in enumerate(spec.layers):
        for kind in range(2):
            t = _layout(np.asarray(kv_outputs[2 * j + kind]), spec.kv_format)
            out.append(cache_io.cache_after(spec, t, past[2 * i + kind], n))
    return out


class OnnxStack:
    """Every pack's session, created on the first step. Only one stack is alive at a time: starting
    one releases the sessions of the one before (each holds a copy of the model's weights, and the
    task check drives the stacks one after the other)."""

    _live: "OnnxStack | None" = None

    def __init__(self, packs: list[Pack], threads: int = 0, fold_casts: bool = False):
        """``fold_casts``: ONNX Runtime's default optimization level (kvplan/runtime/ort_session.py),
        faster for many small steps, at the price of float32 copies of fp16 weights."""
        self.packs, self.threads, self.fold_casts = packs, threads, fold_casts
        self.sessions: list[ort.InferenceSession] | None = None

    def _open(self) -> list[ort.InferenceSession]:
        if self.sessions is None:
            if OnnxStack._live is not None and OnnxStack._live is not self:
                OnnxStack._live.release()
            self.sessions = [session(p.path, self.threads, self.fold_casts) for p in self.packs]
            OnnxStack._live = self
        return self.sessions

    def release(self) -> None:
        self.sessions = None
        if OnnxStack._live is self:
            OnnxStack._live = None

    def run_steps(self, steps: list[tuple], past: list[np.ndarray]) -> list[np.ndarray]:
        """Every step's hidden_out for ``steps`` (hidden, mask, position_ids), whose inputs do not
        depend on the outputs (teacher forcing): pack by pack, each pack's session alone in memory
        running every step with its own layers' cache carried from step to step, then released,
        its hidden_outs handed to the next. What ``step`` computes step by step, but with one
        pack's weights in memory at a time. ``past``: the cache before the first step."""
        if OnnxStack._live is not None:
            OnnxStack._live.release()
        hiddens = [h for h, _, _ in steps]
        for pack in self.packs:
            sess = session(pack.path, self.threads, self.fold_casts)
            held = list(past)
            out = []
            for (_, mask, position_ids), hidden in zip(steps, hiddens):
                outs = sess.run(None, pack_feed(pack.spec, hidden, mask, position_ids, held))
                new = next_past(pack.spec, outs[1:], held, outs[0].shape[1])
                for j, i in enumerate(pack.spec.layers):
                    held[2 * i], held[2 * i + 1] = new[2 * j], new[2 * j + 1]
                out.append(outs[0])
            del sess, held
            hiddens = out
        return hiddens

    def step(self, hidden: np.ndarray, mask: np.ndarray, position_ids: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call over every pack; ``past`` and the returned cache are [k0, v0, k1, v1, ...] in kv format 0."""
        new_past: list[np.ndarray] = []
        for pack, sess in zip(self.packs, self._open()):
            outs = sess.run(None, pack_feed(pack.spec, hidden, mask, position_ids, past))
            hidden = outs[0]
            new_past += next_past(pack.spec, outs[1:], past, hidden.shape[1])
        return hidden, new_past
