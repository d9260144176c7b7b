"""The KV cache a runtime keeps between steps, one per ``kv_io`` mode, and what each step costs it.

- concat: the graph takes the cache (lastSum rows) and returns the next one (sumN rows); the host
  copies nothing, but every step the graph writes the whole cache anew.
- delta: one preallocated buffer per tensor of ``capacity`` rows; the graph takes the first
  lastSum rows and returns only the N new ones, which the host writes into the buffer. With
  kv_format 1 ([B, S, kv_heads, head_dim]) and one batch row the first lastSum rows are one
  contiguous block, fed as they lie; with kv_format 0 they are not (each head's rows are apart),
  so feeding them takes a contiguous copy every step: counted in ``copied``.
- inplace: the graph's cache inputs are the buffer itself (``cache_len`` rows) and it writes the
  N new rows into it at ``write_indices``; bound as both input and output, nothing is copied.

``copied``: bytes of existing cache rows copied on the host (what the mode is meant to avoid);
``written``: bytes of cache the step produced (new rows, or a concat graph's whole new cache).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Traffic:
    copied: int = 0
    written: int = 0
    steps: int = 0

    def per_step(self) -> dict:
        n = max(self.steps, 1)
        return {"steps": self.steps, "copied_bytes_per_step": self.copied // n,
                "written_bytes_per_step": self.written // n}


@dataclass
class KvCache:
    """The cache of every layer, keys and values, in the target's layout: ``tensors[2 * i + kind]``."""
    mode: str
    kv_format: int
    length: int = 0                                     # rows filled (lastSum of the next step)
    tensors: list[np.ndarray] = field(default_factory=list)
    traffic: Traffic = field(default_factory=Traffic)
    handles: dict = field(default_factory=dict)         # a backend's own views of the buffers, by index

    @classmethod
    def empty(cls, mode: str, kv_format: int, layers: int, batch: int, kv_heads: int, head_dim: int,
              capacity: int, dtype) -> "KvCache":
        rows = 0 if mode == "concat" else capacity
        shape = (batch, rows, kv_heads, head_dim) if kv_format == 1 else (batch, kv_heads, rows, head_dim)
        # Finite filler: the masked softmax weighs unused rows by exactly 0, and 0 * NaN is NaN.
        return cls(mode, kv_format, 0, [np.zeros(shape, dtype) for _ in range(2 * layers)])

    @property
    def axis(self) -> int:
        return 1 if self.kv_format == 1 else 2

    @property
    def capacity(self) -> int:
        return self.tensors[0].shape[self.axis] if self.mode != "concat" else 0

    def past(self, index: int) -> np.ndarray:
        """What the graph takes as ``past_*_in``: the cache, its filled rows, or the whole buffer."""
        t = self.tensors[index]
        if self.mode == "inplace":
            return t
        if self.mode == "concat":
            return t
        view = t[:, :self.length] if self.kv_format == 1 else t[:, :, :self.length]
        if view.flags.c_contiguous:
            return view
        self.traffic.copied += view.nbytes
        return np.ascontiguousarray(view)

    def take(self, index: int, output: np.ndarray, n: int) -> None:
        """The graph's KV output of tensor ``index`` after a step of ``n`` tokens."""
        if self.mode == "concat":
            self.tensors[index] = output
            self.traffic.written += output.nbytes
        elif self.mode == "delta":
            end = self.length + n
            if self.kv_format == 1:
                self.tensors[index][:, self.length:end] = output
            else:
                self.tensors[index][:, :, self.length:end] = output
            self.traffic.written += output.nbytes
        else:                          # inplace: the graph wrote into the buffer itself
            self.traffic.written += output.nbytes * n // max(output.shape[self.axis], 1)

    def advance(self, n: int) -> None:
        self.length += n
        self.traffic.steps += 1
