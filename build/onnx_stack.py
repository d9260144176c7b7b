"""Drive exported packs with ONNX Runtime as a deployment runtime would.

Chains packs (hidden_out of one is hidden_in of the next), carries the flattened
cache from step to step, and converts kv format 1 to and from the canonical
[B, kv_heads, S, head_dim] so callers compare against transformers' layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .decoder import StackSpec

NP_DTYPES = {"float32": np.float32, "float16": np.float16}


@dataclass
class Pack:
    spec: StackSpec
    path: Path


class OnnxStack:
    def __init__(self, packs: list[Pack], threads: int = 0):
        import onnxruntime as ort
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.packs = packs
        self.sessions = [ort.InferenceSession(str(p.path), opts, providers=["CPUExecutionProvider"]) for p in packs]

    def step(self, hidden: np.ndarray, mask: np.ndarray, position_ids: np.ndarray,
             past: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call over every pack; ``past`` and the returned cache are [k0, v0, k1, v1, ...] in kv format 0."""
        new_past: list[np.ndarray] = []
        for pack, sess in zip(self.packs, self.sessions):
            feed = {"hidden_in": hidden, "attention_mask": mask, "position_ids": position_ids}
            for j, i in enumerate(pack.spec.layers):
                k, v = past[2 * i], past[2 * i + 1]
                if pack.spec.kv_format == 1:
                    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
                feed[f"past_key_in{i}"] = np.ascontiguousarray(k)
                feed[f"past_value_in{i}"] = np.ascontiguousarray(v)
            outs = sess.run(None, feed)
            hidden = outs[0]
            for k in outs[1:]:
                new_past.append(k.transpose(0, 2, 1, 3) if pack.spec.kv_format == 1 else k)
        return hidden, new_past
