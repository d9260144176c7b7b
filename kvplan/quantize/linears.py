"""Which tensors of a decoder layer are the linears quantization applies to."""
from __future__ import annotations

from kvplan.config import LINEAR_MODULES as MODULES  # noqa: F401  (re-exported: where each linear sits)
from kvplan.config import DecoderConfig
from kvplan.errors import QuantizeError


def weight_name(layer: int, linear: str) -> str:
    return f"layers.{layer}.{MODULES[linear]}.weight"


def in_features(cfg: DecoderConfig, linear: str) -> int:
    if linear == "o_proj":
        return cfg.num_heads * cfg.head_dim
    if linear == "down_proj":
        return cfg.intermediate_size
    return cfg.hidden_size


def check_groups(cfg: DecoderConfig, linears, group_size: int, where: str) -> None:
    """Refused before any work: the first linear whose input size the group size does not divide."""
    for linear in linears:
        k = in_features(cfg, linear)
        if k % group_size:
            raise QuantizeError(f"{where}: quantize.group_size {group_size} does not divide the input size {k} "
                                f"of tensor {weight_name(0, linear)!r} (and every layer's {linear})")
