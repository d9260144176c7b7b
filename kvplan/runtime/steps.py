"""How a runtime cuts its work into the steps a target's optimization profiles take."""
from __future__ import annotations


def chunk_size(profile) -> int:
    """The largest N an optimization profile of the engine takes: a prompt's prefill chunks."""
    return max(s.N.max for s in profile.shapes)


def positions(source, profile) -> int:
    """How many positions a run may use: the profiles' N max + lastSum max, the model's own limit,
    an in-place buffer's rows."""
    limit = min(profile.max_sum, source.config.max_position_embeddings)
    return min(limit, profile.export.cache_len) if profile.export.kv_io == "inplace" else limit
