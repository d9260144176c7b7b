"""Validation points and the data loader that turns them into realistic feed dicts.

A point is (shape profile, which of min/opt/max, N, lastSum, masked, batch). Nothing is
random at a scale the model never sees: every position is fed the model's own embedding of a
token (kvplan.validate.tokens), the point's N new tokens are its row's tokens after the
lastSum it is given, and the past KV comes from a real prefill of transformers' model on
that row's tokens before them, so the cache has the statistics a deployed decoder sees. For
multi-pack targets the pack's ``hidden_in`` is the reference's hidden state entering the pack's
first layer (``output_hidden_states``), so each pack is checked on the inputs it would really
receive.

A profile with a batch range also gets a ``batch`` point per optimization profile: two
rows (more if the range starts above 2) with different numbers of valid past rows, as a
runtime batches sequences of different lengths: the past tensor has lastSum rows, a
shorter row's extra ones are masked out (concat/delta; in-place: its ``write_indices``
is its own length and the buffer's rows after its step are masked), and its
position_ids start at its own length.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvplan import cache_io
from kvplan.export.exporter import causal_mask, input_names
from kvplan.fileio import naming_write_errors
from kvplan.lazy import lazy_import
from kvplan.pipeline import release_memory, trim_heap
from kvplan.validate.reference import slice_decoder

torch = lazy_import("torch")

KINDS = ("min", "opt", "max", "masked", "batch")


@dataclass(frozen=True)
class Point:
    profile: str          # optimization profile name
    profile_index: int
    kind: str             # min | opt | max | masked | batch
    n: int
    last: int             # lastSum: the past tensor's rows
    masked: bool = False
    batch: int = 1
    # kind "batch": each row's own number of valid past rows (row 0's is ``last``); empty: all ``last``
    rows: tuple[int, ...] = ()

    @property
    def label(self) -> str:
        label = f"{self.profile}/{self.kind} N={self.n} lastSum={self.last}"
        return label + (f" B={self.batch} rows={','.join(map(str, self.rows))}" if self.rows else "")

    @property
    def lasts(self) -> tuple[int, ...]:
        """Each row's valid past rows."""
        return self.rows or (self.last,) * self.batch


def parse_kinds(text: str) -> tuple[str, ...]:
    """``--points`` value: comma list of min, opt, max, masked, batch, or all."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or parts == ["all"]:
        return KINDS
    bad = [p for p in parts if p not in KINDS]
    if bad:
        raise ValueError(f"--points: unknown point kind {bad[0]!r} (use a comma list of {', '.join(KINDS)}, or all)")
    return tuple(k for k in KINDS if k in parts)


def select_points(profile, kinds: tuple[str, ...]) -> list[Point]:
    """min/opt/max of every optimization profile (a lastSum = 0 min stays in), plus a
    masked-slot point at opt shapes (at max when opt has fewer than 2 past slots), at the
    smallest batch the profile takes; with a batch range, a ``batch`` point too (batch_point)."""
    points: list[Point] = []
    batch = profile.export.batch_range.min
    for index, sp in enumerate(profile.shapes):
        seen = set()
        for kind in kinds:
            if kind == "batch":
                point = batch_point(profile, index)
                if point is not None:
                    points.append(point)
                continue
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
            points.append(Point(sp.name, index, kind, n, last, kind == "masked", batch=batch))
    return points


def batch_point(profile, index: int) -> Point | None:
    """Optimization profile ``index`` at N opt and lastSum opt (max when opt has no past), at batch
    2 (the range's min when that is larger): row b has lastSum - b * step valid past rows, so
    every row differs from the others. None for a static batch."""
    rng = profile.export.batch_range
    if rng.max == rng.min:
        return None
    sp = profile.shapes[index]
    last = sp.lastSum.opt if sp.lastSum.opt else sp.lastSum.max
    batch = max(2, rng.min)
    step = max(1, last // (2 * (batch - 1)))
    rows = tuple(max(0, last - b * step) for b in range(batch))
    return Point(sp.name, index, "batch", sp.N.opt, last, batch=batch, rows=rows)


def points_batch(points: list[Point]) -> int:
    """Rows the shared prefill needs: the largest batch of any point."""
    return max((p.batch for p in points), default=1)


def reserve_slots(mask: torch.Tensor, last: int) -> torch.Tensor:
    """MiniCPM-o's streaming TTS reserves text slots before they are filled: a block of past
    positions every query must ignore, written as the dtype's large negative."""
    mask = mask.clone()
    start = last // 4
    mask[..., start:start + max(1, last // 4)] = torch.finfo(mask.dtype).min
    return mask


# Attention scores of one prefill chunk stay under this many bytes (eager attention
# materializes [B, heads, chunk, length] in float32, a few times over).
CHUNK_SCORE_BYTES = 64 << 20
# sdpa never materializes the scores (only the [B, 1, chunk, length] mask): chunks of this many
# tokens, where the matmuls are as efficient as they get on a CPU and little of the masked-out
# square is computed (a 3-layer range of the default model: 4.7 s a 4095-token prefill against
# 5.0 s in 341-token chunks and 6.2 s in one).
SDPA_CHUNK = 1024


def prefill_chunk(attention: str, batch: int, heads: int, length: int) -> int:
    """Tokens per prefill chunk for transformers' ``attention`` implementation."""
    if attention == "sdpa":
        return max(16, min(SDPA_CHUNK, CHUNK_SCORE_BYTES // (4 * batch * length)))
    return max(16, CHUNK_SCORE_BYTES // (4 * batch * heads * length))


class Prefill:
    """One real prefill of the longest lastSum any point needs, shared by every point.

    The decoder is causal, so the cache of the first L tokens of a longer prefill is
    exactly the cache of a prefill of those L tokens: slicing it replaces one
    multi-minute CPU prefill per point by one in all. It runs in chunks of tokens, each
    on top of the cache of the ones before (a real prefill all the same, whose attention
    scores never span the whole square), and a few layers at a time: ``make_ref(layers)``
    gives transformers' model holding just those, which runs the whole sequence's hidden
    state through them and hands it to the next. The cache is kept once, in ``dtype``: in
    ``directory`` (one file per layer and K/V, memory-mapped when read, so a point holds only
    what it reads) or, without one, in memory. The points' past KV are views of it.
    ``hidden`` [batch, length, hidden]: the embeddings of the tokens prefilled (tokens.Inputs).
    """

    def __init__(self, make_ref, cfg, segments: list[range], hidden: torch.Tensor, dtype: torch.dtype,
                 directory: Path | None = None, log=None):
        batch, length = hidden.shape[:2]
        self.batch, self.length, self.dtype, self.directory = batch, length, dtype, directory
        self.past: list[torch.Tensor] = []
        if not length:
            self.past = [torch.zeros(batch, cfg.num_kv_heads, 0, cfg.head_dim, dtype=dtype)
                         for _ in range(2 * cfg.num_layers)]
            self.directory = None
            return
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)
        pos = torch.arange(length)[None].expand(batch, length)
        for layers in segments:
            ref = make_ref(layers)
            chunk = prefill_chunk(ref.attention, batch, cfg.num_heads, length)
            decoder = slice_decoder(ref.decoder, layers.start, layers.stop, False)
            cache = ref.new_cache()
            out = []
            with torch.no_grad():
                for start in range(0, length, chunk):
                    stop = min(length, start + chunk)
                    res = decoder(inputs_embeds=hidden[:, start:stop].to(ref.dtype),
                                  attention_mask=causal_mask(batch, stop - start, start, ref.dtype),
                                  position_ids=pos[:, start:stop], use_cache=True, **{ref._cache_kw: cache})
                    out.append(res.last_hidden_state)
                    del res
                    # Each chunk regrows every layer's cache (a concatenation); hand the old buffers back
                    # to the OS rather than let the heap fragment around them (freed by reference counts:
                    # no garbage collection, 0.2 s a time with torch loaded).
                    trim_heap()
            hidden = torch.cat(out, dim=1)         # entering the next range's first layer
            del out, ref, decoder
            for i in layers:                       # converted layer by layer: one float32 layer at a time
                for kind, t in enumerate(_layer_kv(cache, i)):
                    self._keep(i, kind, t.to(dtype))
                _drop_layer(cache, i)
            del cache
            release_memory()
            if log:
                log(f"[validate]   prefill: layers {layers.start}..{layers.stop - 1} done")

    def _file(self, i: int, kind: int) -> Path:
        return self.directory / f"layer{i}.{'kv'[kind]}.npy"

    def _keep(self, i: int, kind: int, t: torch.Tensor) -> None:
        if self.directory is None:
            self.past.append(t)
            return
        # numpy has no bfloat16: its bits are kept as int16 and viewed back.
        array = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy()
        with naming_write_errors(self._file(i, kind)):     # numpy's short-write error names no file
            np.save(self._file(i, kind), array, allow_pickle=False)

    def view(self, i: int, kind: int, last: int) -> torch.Tensor:
        """Layer ``i``'s key (kind 0) or value (1) over the first ``last`` positions (no copy)."""
        if self.directory is None:
            return self.past[2 * i + kind][:, :, :last]
        # Copy-on-write mapping: writable for torch, never written; unmapped with its last view.
        t = torch.from_numpy(np.load(self._file(i, kind), mmap_mode="c", allow_pickle=False))
        t = t.view(torch.bfloat16) if self.dtype == torch.bfloat16 else t
        return t[:, :, :last]


def _layer_kv(cache, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if hasattr(cache, "layers"):
        return cache.layers[i].keys, cache.layers[i].values
    return cache.key_cache[i], cache.value_cache[i]


def _drop_layer(cache, i: int) -> None:
    """Free a layer's tensors in transformers' DynamicCache (either of its layouts)."""
    if hasattr(cache, "layers"):
        cache.layers[i].keys = cache.layers[i].values = None
    else:
        cache.key_cache[i] = cache.value_cache[i] = None


@dataclass
class PointData:
    """What the runners of every pack need for one point; its past KV are views of the shared prefill.

    ``mask`` is [B, 1, N, lastSum + N] over the past tensor's rows and then the step's: a row
    with fewer valid past rows (a ``batch`` point) has the rest masked out (row_mask).
    ``leaving`` holds the hidden state each runner passed on from a range or pack that ends
    before the last layer, by (runner, the next layer): what that runner's next range is fed,
    and (the reference's) what every runner's next pack is fed.
    """
    point: Point
    hidden_in: torch.Tensor
    mask: torch.Tensor
    position_ids: torch.Tensor
    prefill: Prefill
    leaving: dict = field(default_factory=dict)

    def past(self, i: int, kind: int) -> torch.Tensor:
        return self.prefill.view(i, kind, self.point.last)[:self.point.batch]

    def entering(self, layer: int, runner: str):
        """The hidden state entering ``layer`` as ``runner`` passed it on (the point's own at layer 0)."""
        if layer == 0:
            return self.hidden_in
        try:
            return self.leaving[(runner, layer)]
        except KeyError:
            raise RuntimeError(f"point {self.point.label}: {runner} has not run the layers before {layer}") from None


def row_mask(n: int, own: int, last: int, dtype: torch.dtype, window: int = 0) -> torch.Tensor:
    """[1, 1, N, last + N] for a row with ``own`` <= ``last`` valid past rows: its causal mask over
    its own past, then the past tensor's rows it does not have masked out, then the N new rows."""
    mask = causal_mask(1, n, own, dtype, window=window)
    gap = torch.full((1, 1, n, last - own), torch.finfo(dtype).min, dtype=dtype)
    return torch.cat([mask[..., :own], gap, mask[..., own:]], dim=-1)


def point_data(cfg, dtype: torch.dtype, point: Point, prefill: Prefill, hidden: torch.Tensor) -> PointData:
    """The embeddings of N tokens on top of the first lastSum positions of the shared real prefill:
    each row's tokens right after its own valid past (``hidden``: tokens.Inputs.hidden, every row's
    embeddings by position, of which the prefill ran the first ones).

    The prefill may run in float32 (``--prefill-dtype``): the past KV is input data here,
    not something under test, and torch's fp16/bf16 CPU kernels make a 3584-token
    prefill of the default model take many minutes; the float32 cache rounded to the
    profile dtype is what a well-behaved fp16 prefill approximates.
    """
    batch = point.batch
    if hidden.shape[0] < batch or hidden.shape[1] < max(point.lasts) + point.n:
        raise ValueError(f"point {point.label}: the inputs hold {hidden.shape[0]} row(s) of {hidden.shape[1]} "
                         f"positions, too few")
    hidden = torch.stack([hidden[b, own:own + point.n] for b, own in enumerate(point.lasts)]).to(dtype)
    if point.rows:
        mask = torch.cat([row_mask(point.n, own, point.last, dtype, cfg.sliding_window) for own in point.rows])
        pos = torch.stack([torch.arange(own, own + point.n, dtype=torch.int64) for own in point.rows])
    else:
        mask = causal_mask(batch, point.n, point.last, dtype, window=cfg.sliding_window)
        if point.masked:
            mask = reserve_slots(mask, point.last)
        pos = torch.arange(point.last, point.last + point.n, dtype=torch.int64)[None]
        pos = pos.expand(batch, point.n).contiguous()
    return PointData(point, hidden, mask, pos, prefill)


def own_columns(mask: torch.Tensor, own: int, last: int) -> torch.Tensor:
    """A row's mask over its own past and the new rows only (the columns row_mask masked out dropped)."""
    return torch.cat([mask[..., :own], mask[..., last:]], dim=-1)


def to_feed_value(t: torch.Tensor):
    """numpy where numpy has the dtype; bfloat16 stays a torch tensor (Polygraphy takes both)."""
    t = t.detach().contiguous()
    return t if t.dtype == torch.bfloat16 else t.numpy()


def to_kv_format(t: torch.Tensor, kv_format: int) -> torch.Tensor:
    return t.transpose(1, 2).contiguous() if kv_format == 1 else t


def feed_for(data: PointData, spec, hidden, names=None) -> OrderedDict:
    """The pack's contract inputs (of ``names`` only, when given), in the graph's input order
    (kv_io = "inplace": the cache in a buffer of cache_len rows, see build/cache_io.py; a ``batch``
    point's rows each write at their own length, so their masks cover their own past and step,
    the rest of the buffer masked)."""
    mask, lasts = data.mask, None
    if spec.kv_io == "inplace" and data.point.rows:
        p = data.point
        lasts = p.lasts
        fill = torch.finfo(mask.dtype).min
        mask = torch.cat([torch.nn.functional.pad(own_columns(mask[b:b + 1], own, p.last), (0, p.last - own),
                                                  value=fill) for b, own in enumerate(lasts)])
    hidden = hidden if isinstance(hidden, torch.Tensor) else torch.from_numpy(np.asarray(hidden))
    feed = cache_io.graph_feed(spec, hidden, mask, data.position_ids,
                               lambda i, kind: to_kv_format(data.past(i, kind), spec.kv_format), lasts, names)
    return OrderedDict((name, to_feed_value(feed[name])) for name in input_names(spec)
                       if names is None or name in names)


class LazyFeed(OrderedDict):
    """A feed whose tensors are made one at a time as ``items()`` reaches them (how the JSON encoder
    reads a dict): a whole pack's inputs written to a file with one tensor in memory at a time."""

    def __init__(self, names, make):
        super().__init__((name, None) for name in names)
        self._make = make

    def items(self):
        for name in list(self.keys()):
            yield name, self._make(name)

    def values(self):
        return (value for _, value in self.items())

    def __getitem__(self, name):
        super().__getitem__(name)          # KeyError for a name the pack has not
        return self._make(name)


def lazy_feed(data: PointData, spec, hidden) -> LazyFeed:
    """``feed_for``'s feed, each tensor made (alone) when read."""
    return LazyFeed(input_names(spec), lambda name: feed_for(data, spec, hidden, {name})[name])


def as_float32(value) -> np.ndarray:
    """Any runner's output as float32 numpy, for comparison."""
    if isinstance(value, torch.Tensor):
        return value.detach().float().cpu().numpy()
    return np.asarray(value).astype(np.float32)
