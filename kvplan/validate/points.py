"""Validation points and the data loader that turns them into realistic feed dicts.

A point is (shape profile, which of min/opt/max, N, lastSum, masked). The past
KV is never random: it comes from a real prefill of transformers' model, so the
cache has the statistics a deployed decoder sees. For multi-pack targets the
pack's ``hidden_in`` is the reference's hidden state entering the pack's first
layer (``output_hidden_states``), so each pack is checked on the inputs it would
really receive.
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

from kvplan import cache_io
from kvplan.export.exporter import causal_mask, input_names

KINDS = ("min", "opt", "max", "masked")


@dataclass(frozen=True)
class Point:
    profile: str          # optimization profile name
    profile_index: int
    kind: str             # min | opt | max | masked
    n: int
    last: int
    masked: bool = False

    @property
    def label(self) -> str:
        return f"{self.profile}/{self.kind} N={self.n} lastSum={self.last}"

    @property
    def seed(self) -> int:
        return int.from_bytes(hashlib.sha256(self.label.encode()).digest()[:4], "little") % 2**31


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--points`` value: comma list of min, opt, max, masked, or all."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or parts == ["all"]:
        return KINDS
    bad = [p for p in parts if p not in KINDS]
    if bad:
        raise ValueError(f"--points: unknown point kind {bad[0]!r} (use a comma list of {', '.join(KINDS)}, or all)")
    return tuple(k for k in KINDS if k in parts)


def select_points(profile, kinds: tuple[str, ...]) -> list[Point]:
    """min/opt/max of every optimization profile (a lastSum = 0 min stays in), plus a
    masked-slot point at opt shapes (at max when opt has fewer than 2 past slots)."""
    points: list[Point] = []
    for index, sp in enumerate(profile.shapes):
        seen = set()
        for kind in kinds:
            if kind == "masked":
                n, last = (sp.N.opt, sp.lastSum.opt) if sp.lastSum.opt >= 2 else (sp.N.max, sp.lastSum.max)
                if last < 2:
                    continue     # nothing in the past to leave unfilled
            else:
                n, last = getattr(sp.N, kind), getattr(sp.lastSum, kind)
            key = (n, last, kind == "masked")
            if key in seen:
                continue
            seen.add(key)
            points.append(Point(sp.name, index, kind, n, last, kind == "masked"))
    return points


def reserve_slots(mask: torch.Tensor, last: int) -> torch.Tensor:
    """MiniCPM-o's streaming TTS reserves text slots before they are filled: a block of past
    positions every query must ignore, written as the dtype's large negative."""
    mask = mask.clone()
    start = last // 4
    mask[..., start:start + max(1, last // 4)] = torch.finfo(mask.dtype).min
    return mask


@dataclass
class PointData:
    """Everything the runners of every pack need for one point, in the canonical KV layout."""
    point: Point
    hidden: list[torch.Tensor]        # hidden state entering layer i (index = layer), [B, N, hidden]
    mask: torch.Tensor
    position_ids: torch.Tensor
    past: list[torch.Tensor]          # [k0, v0, k1, v1, ...] in [B, kv_heads, lastSum, head_dim]


class Prefill:
    """One real prefill of the longest lastSum any point needs, shared by every point.

    The decoder is causal, so the cache of the first L tokens of a longer prefill is
    exactly the cache of a prefill of those L tokens: slicing it replaces one
    multi-minute CPU prefill per point by one in all.
    """

    def __init__(self, ref, batch: int, length: int, seed: int = 0):
        cfg = ref.source.config
        cache = ref.prefill(batch, length, seed=seed)
        self.past = ref.cache_tensors(cache, cfg.num_layers) if length else [
            torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim, dtype=ref.dtype) for _ in range(2 * cfg.num_layers)]

    def first(self, last: int) -> list[torch.Tensor]:
        return [t[:, :, :last].clone() for t in self.past]


def point_data(ref, point: Point, batch: int, need_layers: list[int], prefill_ref=None,
               prefill: Prefill | None = None) -> PointData:
    """Real prefill of ``lastSum`` tokens, then N fresh embeddings on top of it.

    ``prefill``: a shared longer prefill to take the first lastSum positions from
    (otherwise one is run for this point).

    ``need_layers``: layers whose incoming hidden state is needed (pack starts);
    anything past layer 0 costs one extra full forward with output_hidden_states.
    ``prefill_ref``: a float32 twin of ``ref`` for the prefill. The past KV is input
    data here, not something under test, and torch's fp16/bf16 CPU kernels make a
    3584-token prefill of the default model take many minutes; the float32 cache
    rounded to the profile dtype is what a well-behaved fp16 prefill approximates.
    """
    cfg = ref.source.config
    dtype = ref.dtype
    prefill_ref = prefill_ref or ref
    prefill = prefill or Prefill(prefill_ref, batch, point.last, seed=point.seed)
    cache = ref.new_cache()
    if point.last:
        past = [t.to(dtype) for t in prefill.first(point.last)]
        for i in range(cfg.num_layers):
            cache.update(past[2 * i].clone(), past[2 * i + 1].clone(), i)
    else:
        past = [torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.num_layers)]
    g = torch.Generator().manual_seed(point.seed + 1)
    hidden = torch.randn(batch, point.n, cfg.hidden_size, generator=g).to(dtype)
    mask = causal_mask(batch, point.n, point.last, dtype, window=cfg.sliding_window)
    if point.masked:
        mask = reserve_slots(mask, point.last)
    pos = torch.arange(point.last, point.last + point.n, dtype=torch.int64)[None].expand(batch, point.n).contiguous()
    states = [hidden]
    if any(i > 0 for i in need_layers):
        with torch.no_grad():
            out = ref.decoder(inputs_embeds=hidden, attention_mask=mask, position_ids=pos, use_cache=True,
                              output_hidden_states=True, **{ref._cache_kw: cache})
        # hidden_states[i] enters layer i; the last entry is after the final norm.
        states = list(out.hidden_states[:cfg.num_layers])
    return PointData(point, states, mask, pos, past)


def to_feed_value(t: torch.Tensor):
    """numpy where numpy has the dtype; bfloat16 stays a torch tensor (Polygraphy takes both)."""
    t = t.detach().contiguous()
    return t if t.dtype == torch.bfloat16 else t.numpy()


def to_kv_format(t: torch.Tensor, kv_format: int) -> torch.Tensor:
    return t.transpose(1, 2).contiguous() if kv_format == 1 else t


def feed_for(data: PointData, spec) -> OrderedDict:
    """The pack's contract inputs, in the graph's input order (kv_io = "inplace": the cache in
    a buffer of cache_len rows, see build/cache_io.py)."""
    feed = cache_io.graph_feed(spec, data.hidden[spec.first_layer], data.mask, data.position_ids,
                               lambda i, kind: to_kv_format(data.past[2 * i + kind], spec.kv_format))
    return OrderedDict((name, to_feed_value(feed[name])) for name in input_names(spec))


def as_float32(value) -> np.ndarray:
    """Any runner's output as float32 numpy, for comparison."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value).astype(np.float32)
