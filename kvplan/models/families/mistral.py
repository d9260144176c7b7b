"""Mistral: Llama's layer without biases, with a sliding window on every layer.

The window is honoured, not dropped: every layer attends to the last ``sliding_window``
positions, which the runtime's additive mask expresses (kvplan.export.causal_mask(window=))
with the graph unchanged. transformers' MistralConfig defaults the window to 4096 when
config.json leaves the field out; kvplan reads it the same way.
"""
from __future__ import annotations

from kvplan.config import DecoderConfig
from kvplan.models.families.registry import Family, Fields, register, window

DEFAULT_WINDOW = 4096       # MistralConfig's default


@register
class Mistral(Family):
    name = "mistral"
    reference_classes = ("MistralModel", "MistralForCausalLM")

    @property
    def tiny(self) -> DecoderConfig:
        # A window shorter than the tests' sequences, so it matters.
        return DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2,
                             head_dim=16, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
                             vocab_size=256, sliding_window=6, family="mistral")

    def switches(self, f: Fields, common):
        # Absent: MistralConfig's default; null: no window.
        size = None if "sliding_window" in f.hf and f.hf["sliding_window"] is None else \
            f.int("sliding_window", DEFAULT_WINDOW)
        return {"sliding_window": window(f, size, [True] * common["num_layers"], common["max_position_embeddings"])}

    def hf_config(self, cfg):
        return super().hf_config(cfg) | {"sliding_window": cfg.sliding_window or None}
