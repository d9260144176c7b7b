"""Qwen3: Llama's layer with a per-head RMSNorm on q and k (before the rotary);
``attention_bias`` puts a bias on q, k, v and o. Sliding windows as Qwen2's."""
from __future__ import annotations

from kvplan.config import DecoderConfig
from kvplan.models.families.qwen2 import qwen_window
from kvplan.models.families.registry import Family, Fields, register


@register
class Qwen3(Family):
    name = "qwen3"
    reference_classes = ("Qwen3Model", "Qwen3ForCausalLM")

    @property
    def tiny(self) -> DecoderConfig:
        return DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=32, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=4096,
                             qk_norm=True, vocab_size=256, family="qwen3")

    def switches(self, f: Fields, common):
        bias = f.bool("attention_bias")
        return {"qk_norm": True, "qkv_bias": bias, "o_bias": bias, "sliding_window": qwen_window(f, common)}

    def hf_config(self, cfg):
        return super().hf_config(cfg) | {"attention_bias": cfg.qkv_bias}
