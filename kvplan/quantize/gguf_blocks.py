"""A GGUF file's own int4 blocks as kvplan's int4 linears, exactly (no requantization).

GGUF blocks run along a row's input dimension (ne0), as DequantizeLinear's blocks on axis 0 of
W^T do. The block layouts (llama.cpp's ggml-common.h), per row of a linear:

- ``block_q4_0`` (18 bytes, 32 values): fp16 ``d``, then 16 bytes ``qs``; value j < 16 is the low
  nibble of ``qs[j]``, value j + 16 its high nibble. W = d·(q − 8): INT4 q − 8, scale d, no
  correction.
- ``block_q4_1`` (20 bytes, 32 values): fp16 ``d``, fp16 ``m``, ``qs`` as Q4_0. W = d·q + m =
  d·(q − 8) + (8d + m): scale d and the per-group correction 8d + m, the form an AutoAWQ zero point
  takes (kvplan.quantize.graph adds (x summed per group) @ correction).
- ``block_q4_K`` (144 bytes, 256 values in 8 sub-blocks of 32): fp16 ``d``, fp16 ``dmin``, 12 bytes
  of 6-bit sub-block scales and mins (``get_scale_min_k4``: for j < 4, sc = s[j] & 63 and
  m = s[j + 4] & 63; for j ≥ 4, sc = (s[j + 4] & 15) | (s[j − 4] >> 6) << 4 and
  m = (s[j + 4] >> 4) | (s[j] >> 6) << 4), then 128 bytes ``qs``: 32-byte chunk c holds
  sub-block 2c in its low nibbles and 2c + 1 in its high ones. W = (d·sc)·q − dmin·m =
  (d·sc)·(q − 8) + (8·d·sc − dmin·m): scale d·sc per 32 values and that correction.

So the block is always 32, whatever the profile's group size. Linears stored in any other type
(Q5/Q6/Q8, F16, ...) are not int4 blocks: they stay in the profile dtype, dequantized, each reported.
"""
from __future__ import annotations

import collections
from typing import Callable

import numpy as np

from kvplan.errors import QuantizeError
from kvplan.lazy import lazy_import
from kvplan.models import families
from kvplan.models.gguf import GGUFFile, T
from kvplan.quantize.linears import weight_name
from kvplan.quantize.weights import Quantized, QuantLinear

torch = lazy_import("torch")

BLOCK = 32
INT4_TYPES = (T.Q4_0, T.Q4_1, T.Q4_K)
_BYTES = {T.Q4_0: 18, T.Q4_1: 20, T.Q4_K: 144}


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte ``at`` of every block, as float32 [..., 1]."""
    return np.ascontiguousarray(blocks[..., at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[..., n] bytes -> [..., 2n] values: the n low nibbles, then the n high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _scale_min_k4(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 packed bytes [..., 12] -> 6-bit scales and mins [..., 8]."""
    s = s.astype(np.int32)
    sc = np.empty(s.shape[:-1] + (8,), np.int32)
    mn = np.empty_like(sc)
    for j in range(8):
        if j < 4:
            sc[..., j], mn[..., j] = s[..., j] & 63, s[..., j + 4] & 63
        else:
            sc[..., j] = (s[..., j + 4] & 0x0F) | ((s[..., j - 4] >> 6) << 4)
            mn[..., j] = (s[..., j + 4] >> 4) | ((s[..., j] >> 6) << 4)
    return sc, mn


def unpack(data: np.ndarray, kind, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A row-major int4 GGUF tensor (``data`` uint8 [rows, bytes]) -> (q − 8 int8 [rows, cols], scale
    float32 [rows, cols/32], correction float32 [rows, cols/32] or None), W = (q − 8)·scale + correction."""
    per_block = 256 if kind == T.Q4_K else BLOCK
    blocks = np.asarray(data, dtype=np.uint8).reshape(rows, cols // per_block, _BYTES[kind])
    if kind == T.Q4_K:
        d, dmin = _f16(blocks, 0), _f16(blocks, 2)                         # [rows, n, 1]
        sc, mn = _scale_min_k4(blocks[..., 4:16])                          # [rows, n, 8]
        scale = d * sc.astype(np.float32)
        low_mins = dmin * mn.astype(np.float32)
        chunks = blocks[..., 16:].reshape(rows, -1, 4, 32)
        q = np.stack([chunks & 0x0F, chunks >> 4], axis=3).reshape(rows, -1, 8, 32)
        correction = np.float32(8) * scale - low_mins
    else:
        d = _f16(blocks, 0)
        scale = d
        q = _nibbles(blocks[..., 2 if kind == T.Q4_0 else 4:])              # [rows, n, 32]
        correction = np.float32(8) * d + _f16(blocks, 2) if kind == T.Q4_1 else None
    codes = torch.from_numpy((q.astype(np.int16) - 8).astype(np.int8).reshape(rows, cols))
    scale = torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, cols // BLOCK))
    if correction is not None:
        correction = torch.from_numpy(np.ascontiguousarray(correction, dtype=np.float32).reshape(rows, cols // BLOCK))
    return codes, scale, correction


def linear(file: GGUFFile, name: str) -> QuantLinear:
    """kvplan's linear ``name`` (``layers.0.self_attn.q_proj.weight``) from its GGUF int4 blocks."""
    cfg = file.cfg
    family = families.get(cfg.family)
    checkpoint = family.checkpoint_name(cfg, name)
    t = file.tensor(checkpoint)
    cols, rows = (int(x) for x in t.shape)
    if t.tensor_type not in INT4_TYPES:
        raise QuantizeError(f"{file.path}: tensor {t.name!r}: type {t.tensor_type.name} is not an int4 block type")
    parts = unpack(t.data, t.tensor_type, rows, cols)
    # Every part is per row: the rows are put in the checkpoint's order (llama.cpp's q/k permute
    # undone) and cut as the family cuts the weight itself (Phi-3's fused projections).
    q, scale, correction = (None if p is None else family.from_checkpoint(cfg, name, file.rows(checkpoint, p))
                            for p in parts)
    return QuantLinear(q.t().contiguous(), scale.t().contiguous(), BLOCK,
                       None if correction is None else correction.t().contiguous())


def linear_types(file: GGUFFile, linears) -> dict:
    """Each of ``linears``' tensors in every layer (kvplan's names) -> its GGUF type."""
    cfg = file.cfg
    family = families.get(cfg.family)
    names = [weight_name(layer, linear) for layer in range(cfg.num_layers) for linear in linears]
    return {n: file.tensor(family.checkpoint_name(cfg, n)).tensor_type for n in names}


def has_blocks(source, linears) -> bool:
    """Whether ``source`` is a GGUF file holding some of ``linears`` as int4 blocks (then an int4
    profile imports them; a GGUF without any is a float source like any other)."""
    file = getattr(source, "gguf", None)
    return file is not None and any(t in INT4_TYPES for t in linear_types(file, linears).values())


def quantized(source, settings, log: Callable[[str], None] = print) -> Quantized:
    """The int4 linears of ``source`` (a GGUF source) stored as int4 blocks, among the profile's
    ``linears``; the others are left in the profile dtype. Every choice is logged and recorded."""
    file: GGUFFile = source.gguf
    cfg = file.cfg
    types = linear_types(file, settings.linears)
    names = list(types)
    imported = [n for n in names if types[n] in INT4_TYPES]
    kept = collections.defaultdict(list)
    for n in names:
        if types[n] not in INT4_TYPES:
            kept[types[n].name].append(n)
    why = (f"quantize.method {settings.method!r} (group_size {settings.group_size}) not applied: {file.path.name} "
           f"holds its own int4 blocks, imported exactly with block {BLOCK} (never requantized)")
    log(f"[quantize] gguf: {why}")
    out = Quantized(record={"method": "import-gguf", "group_size": BLOCK, "file": str(file.path),
                            "not_applied": why, "imported": {}, "kept": {k: v for k, v in kept.items()}})
    blocks = collections.Counter()
    for layer in range(cfg.num_layers):
        for n in imported:
            if n.startswith(f"layers.{layer}."):
                ql = linear(file, n)
                out.linears[n] = ql
                blocks[types[n].name] += ql.scale.numel()
        log(f"[quantize] gguf: layer {layer + 1}/{cfg.num_layers} read")
    counts = collections.Counter(types[n].name for n in imported)
    out.record["imported"] = {k: {"linears": counts[k], "blocks_of_32": blocks[k]} for k in sorted(counts)}
    log(f"[quantize] gguf: imported {len(imported)} linears as int4 block {BLOCK}: "
        + (", ".join(f"{k} {counts[k]} linears ({blocks[k]} blocks)" for k in sorted(counts)) or "none"))
    log("[quantize] gguf: kept in the profile dtype (not int4 blocks): "
        + ("; ".join(f"{k} {len(v)} linears ({', '.join(v[:3])}{', ...' if len(v) > 3 else ''})"
                     for k, v in sorted(kept.items())) or "none"))
    return out
