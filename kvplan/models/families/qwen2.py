"""Qwen2: Llama's layer with a bias on q, k and v (never on o or the MLP).

``use_sliding_window`` slides the layers from ``max_window_layers`` on: all of them
(max_window_layers = 0) is honoured through the mask; some only is refused
(registry.window says why).
"""
from __future__ import annotations

from kvplan.config import DecoderConfig
from kvplan.models.families.registry import Family, Fields, layer_types, register, window


def qwen_window(f: Fields, common) -> int:
    n = common["num_layers"]
    if not f.bool("use_sliding_window") or not f.has("sliding_window"):
        return 0
    first = f.int("max_window_layers", 28)
    sliding = layer_types(f, n, ["sliding_attention" if i >= first else "full_attention" for i in range(n)])
    return window(f, f.int("sliding_window"), sliding, common["max_position_embeddings"])


@register
class Qwen2(Family):
    name = "qwen2"
    reference_classes = ("Qwen2Model", "Qwen2ForCausalLM")

    @property
    def tiny(self) -> DecoderConfig:
        return DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=16, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096,
                             qkv_bias=True, vocab_size=256, family="qwen2")

    def switches(self, f: Fields, common):
        return {"qkv_bias": True, "sliding_window": qwen_window(f, common)}
