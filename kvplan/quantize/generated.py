"""Calibration text the model writes itself: seeded sampling from its own LM head.

AWQ needs activations the model would see, and a user often has no text at hand (or none of the
model's domain). A trained model's own samples are such text: each sequence starts at the
model's BOS token and continues by sampling the model's next-token distribution (temperature
1, the most likely TOP_K tokens, special tokens never sampled), ``samples`` sequences side by
side, ``tokens`` tokens each, seeded. The model runs as kvplan's own decoder in float32 with its
KV cache fed back step by step, so the whole model is in memory for this (4 bytes a weight).
"""
from __future__ import annotations

import time
from typing import Callable

from kvplan.decoder import DecoderStack, StackSpec
from kvplan.export.exporter import causal_mask
from kvplan.lazy import lazy_import
from kvplan.models.embedding import embed
from kvplan.models.presets import tensor_shapes

torch = lazy_import("torch")

# Sampling from the whole distribution at temperature 1 sometimes picks a token far in the tail,
# after which a small model loses the thread. The narrower the choice, the more the text reads like
# text the model is later given, and the better AWQ calibrated on it does: on SmolLM2-135M (8 x 128
# tokens, group 64) its perplexity loss against round-to-nearest's on two texts no calibration saw
# was 0.47 / 0.60 sampling the 50 likeliest tokens and 0.31 / 0.52 with 10 (bench/results/
# perplexity-2026-12-03*.md; 0.53 / 0.68 against 0.28 / 0.50 on the machine of the 12-02 files).
TOP_K = 10


# One torch thread: each step is a few hundred small matrix-vector products, which a second OpenMP
# thread does not speed up and which a busy second core slows down many times over (measured: 2 x 24
# tokens of SmolLM2-135M in 61 s on two threads with other jobs running, 3 s on one).
THREADS = 1


def sample_ids(source, samples: int, tokens: int, seed: int, start: int, banned: tuple[int, ...] = (),
               log: Callable[[str], None] = print) -> torch.Tensor:
    """[samples, tokens] int64 token ids: ``start`` then ``tokens - 1`` sampled ones per row."""
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _sample_ids(source, samples, tokens, seed, start, banned, log)
    finally:
        torch.set_num_threads(threads)


def _sample_ids(source, samples, tokens, seed, start, banned, log) -> torch.Tensor:
    cfg = source.config
    with torch.device("meta"):
        stack = DecoderStack(cfg, StackSpec(0, cfg.num_layers, True))
    stack.load_state_dict({n: t.to(torch.float32) for n, t in source.read_tensors(list(tensor_shapes(cfg))).items()},
                          assign=True, strict=False)
    stack.rotary = type(stack.rotary)(cfg, torch.float32)      # its buffers were made on the meta device
    stack.eval()
    lm = source.read_lm()
    matrix, head = lm["embed_tokens.weight"].to(torch.float32), lm["lm_head.weight"].to(torch.float32)
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((samples, 1), start, dtype=torch.long)
    past = [torch.zeros(samples, cfg.num_kv_heads, 0, cfg.head_dim)] * (2 * cfg.num_layers)
    t0 = time.perf_counter()
    with torch.no_grad():
        for step in range(tokens - 1):
            x = embed(source, ids[:, -1:], matrix)
            mask = causal_mask(samples, 1, step, torch.float32)
            position = torch.full((samples, 1), step, dtype=torch.long)
            hidden, *past = stack(x, mask, position, *past)
            logits = hidden[:, -1] @ head.t()
            if banned:
                logits[:, list(banned)] = float("-inf")
            top, where = logits.topk(TOP_K, dim=-1)
            choice = torch.multinomial(torch.softmax(top, dim=-1), 1, generator=g)
            ids = torch.cat([ids, where.gather(1, choice)], dim=1)
    log(f"[quantize] calibration: the model wrote {samples} x {tokens} tokens of its own in "
        f"{time.perf_counter() - t0:.1f} s")
    return ids
