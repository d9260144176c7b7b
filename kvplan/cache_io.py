"""How a runtime drives each ``kv_io`` mode, from a cache kept as a list of [B, kv_heads, L, head_dim].

Host-side code (ONNX Runtime stacks, validation feeds, the reference runner) keeps
the cache in that canonical form and converts at the graph boundary:

- concat: feed the cache (length lastSum); the outputs are the next cache (sumN rows).
- delta: feed the cache; the outputs are the N new rows, appended here.
- inplace: feed a buffer of ``spec.cache_len`` rows holding the cache in its first
  lastSum rows, a mask over the whole buffer and ``write_indices`` = lastSum; the
  outputs are the buffer with the N new rows written. Rows past lastSum + N keep
  whatever the buffer held (here ``STALE``, so a graph that read them unmasked would
  be caught); they must be finite: the masked softmax weighs them by exactly 0,
  and 0 * NaN is NaN.

Works on numpy arrays and torch tensors alike (validation feeds bfloat16 as torch).
"""
from __future__ import annotations

import numpy as np

from kvplan.lazy import lazy_import

torch = lazy_import("torch")

STALE = 1.0


def _full(like, shape, value):
    if isinstance(like, torch.Tensor):
        return torch.full(shape, value, dtype=like.dtype)
    return np.full(shape, value, dtype=like.dtype)


def _min(like) -> float:
    dtype = like.dtype
    return float(torch.finfo(dtype).min) if isinstance(like, torch.Tensor) else float(np.finfo(dtype).min)


def buffer(spec, past, stale: float = STALE):
    """A cache ``past`` [B, H, lastSum, D] placed in a fresh buffer of ``spec.cache_len`` rows."""
    b, h, last, d = past.shape
    if last > spec.cache_len:
        raise ValueError(f"lastSum {last} does not fit the in-place buffer of {spec.cache_len} rows")
    out = _full(past, (b, h, spec.cache_len, d), stale)
    out[:, :, :last] = past
    return out


def buffer_mask(spec, mask):
    """The step's mask [B, 1, N, lastSum + N] widened to the buffer: the rows beyond are masked."""
    b, one, n, total = mask.shape
    if total > spec.cache_len:
        raise ValueError(f"lastSum + N = {total} does not fit the in-place buffer of {spec.cache_len} rows")
    out = _full(mask, (b, one, n, spec.cache_len), _min(mask))
    out[..., :total] = mask
    return out


def write_indices(batch: int, last: int) -> np.ndarray:
    return np.full((batch,), last, dtype=np.int64)


def graph_feed(spec, hidden, mask, position_ids, past_of, lasts=None, names=None) -> dict:
    """The contract inputs of one pack in graph order; ``past_of(layer, kind)`` gives the
    canonical cache of a layer (kind 0 key, 1 value), already in the pack's kv format.
    kv_io = "inplace": ``lasts`` (one per batch row) are the rows' own lengths, where each
    writes its N new rows; by default every row's is lastSum. ``names``: only those cache
    inputs are made (the others are left out)."""
    inplace = spec.kv_io == "inplace"
    feed = {"hidden_in": hidden, "attention_mask": buffer_mask(spec, mask) if inplace else mask,
            "position_ids": position_ids}
    if inplace:
        n = mask.shape[2]
        last = mask.shape[3] - n
        feed["write_indices"] = write_indices(hidden.shape[0], last) if lasts is None else \
            np.asarray(lasts, dtype=np.int64)
        if isinstance(hidden, torch.Tensor):
            feed["write_indices"] = torch.from_numpy(feed["write_indices"])
    for i in spec.layers:
        for kind, name in enumerate(("key", "value")):
            name = f"past_{name}_in{i}"
            if names is None or name in names:
                past = past_of(i, kind)
                feed[name] = buffer(spec, past) if inplace else past
                if inplace and lasts is not None:
                    # A shorter row's rows from its own length on are not its past but where it
                    # writes: stale, so a step that wrote them elsewhere would read stale keys.
                    for b, own in enumerate(lasts):
                        feed[name][b, :, own:] = STALE
    return feed


def cache_after(spec, output, past, n: int):
    """A layer's canonical cache after the step, from its KV output and its cache before it."""
    if spec.kv_io == "delta":
        if isinstance(output, torch.Tensor):
            return torch.cat([past, output], dim=2)
        return np.concatenate([past, output], axis=2)
    if spec.kv_io == "inplace":
        return output[:, :, :past.shape[2] + n]
    return output
