"""Llama (and MiniCPM-o 2.6's TTS decoder, a LlamaModel): the base of the family tree.

``attention_bias`` puts a bias on q, k, v and o; ``mlp_bias`` on gate, up and down.
"""
from __future__ import annotations

from kvplan.config import DecoderConfig
from kvplan.models.families.registry import Family, Fields, register


@register
class Llama(Family):
    name = "llama"
    reference_classes = ("LlamaModel", "LlamaForCausalLM")

    @property
    def tiny(self) -> DecoderConfig:
        return DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                             vocab_size=256, family="llama")

    def switches(self, f: Fields, common):
        bias = f.bool("attention_bias")
        return {"qkv_bias": bias, "o_bias": bias, "mlp_bias": f.bool("mlp_bias")}

    def hf_config(self, cfg):
        return super().hf_config(cfg) | {"attention_bias": cfg.qkv_bias, "mlp_bias": cfg.mlp_bias}
