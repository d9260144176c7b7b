"""Gemma 2: Llama's attention with GeGLU (tanh-gelu), (1 + w) norm gains, sandwich norms,
its own attention scale, soft-capped attention logits and sliding-window layers.

- Norms: Gemma multiplies by (1 + w). The gain is folded into the weight when the checkpoint
  is read (1 + w in fp32, then the profile's dtype), so the graph has the one RMSNorm
  spelling the rmsnorm pass fuses. Gemma rounds (x * (1 + w)) to the dtype once where
  kvplan rounds x and the gain: within the profiles' tolerances in fp16/bf16, exact in fp32.
- Scale: query_pre_attn_scalar ** -0.5 (not head_dim ** -0.5).
- Attention soft-capping (attn_logit_softcapping): exported exactly (cap * tanh(s / cap),
  before the mask). It is not fused: ONNX's Attention applies its softcap after adding
  the mask, which would no longer mask; the attention pass reports those layers as near misses.
- Sliding-window layers (every other layer, sliding_window positions): kvplan's layers share
  one mask, so they cannot slide while the others do not. A sliding layer attends exactly
  like a global one while sumN <= sliding_window, so kvplan caps the model's positions at
  the window (max_position_embeddings = min(its own, sliding_window)); a profile beyond it
  is refused when it loads.
- Embedding scale (embeddings * sqrt(hidden_size)) and final_logit_softcapping belong to the
  embedding and the LM head, which the graph does not contain: they are the runtime's job.
  ``hidden_in`` is the scaled embedding (transformers' Gemma2TextScaledWordEmbedding output).
"""
from __future__ import annotations

from kvplan.config import DecoderConfig
from kvplan.models.families.registry import Family, Fields, layer_types, register


def _is_norm(name: str) -> bool:
    return name.endswith("norm.weight")


@register
class Gemma2(Family):
    name = "gemma2"
    reference_classes = ("Gemma2Model", "Gemma2ForCausalLM")
    activations = ("gelu_pytorch_tanh",)
    act_key = "hidden_activation"
    # Gemma2Config's defaults.
    defaults = {"head_dim": 256, "rms_norm_eps": 1e-6, "max_position_embeddings": 8192,
                "query_pre_attn_scalar": 256, "sliding_window": 4096, "attn_logit_softcapping": 50.0,
                "final_logit_softcapping": 30.0,
                "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh"}

    @property
    def tiny(self) -> DecoderConfig:
        # query_pre_attn_scalar 24 (not head_dim) so a wrong scale shows; a cap small enough
        # to bite at tiny weights' logits.
        return DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
                             head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
                             vocab_size=256, tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh",
                             sandwich_norm=True, attn_scale=24 ** -0.5, attn_softcap=0.05, family="gemma2")

    def switches(self, f: Fields, common):
        if f.bool("use_bidirectional_attention"):
            raise f.error("use_bidirectional_attention is not supported: kvplan exports causal decoders")
        n, max_positions = common["num_layers"], common["max_position_embeddings"]
        sliding = layer_types(f, n, ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)])
        window = f.int("sliding_window") if f.has("sliding_window") else 0
        if window and any(sliding):
            max_positions = min(max_positions, window)
        bias = f.bool("attention_bias")
        cap = f.float("attn_logit_softcapping") if f.has("attn_logit_softcapping") else 0.0
        final_cap = f.float("final_logit_softcapping") if f.has("final_logit_softcapping") else 0.0
        return {"sandwich_norm": True, "attn_scale": f.float("query_pre_attn_scalar", positive=True) ** -0.5,
                "attn_softcap": cap, "qkv_bias": bias, "o_bias": bias, "max_position_embeddings": max_positions,
                "logit_softcap": final_cap}

    def hf_config(self, cfg):
        return super().hf_config(cfg) | {
            "query_pre_attn_scalar": round(cfg.scale ** -2), "attn_logit_softcapping": cfg.attn_softcap or None,
            "final_logit_softcapping": cfg.logit_softcap or None, "attention_bias": cfg.qkv_bias,
            # Every position inside the window: the sliding layers attend as the global ones.
            "sliding_window": cfg.max_position_embeddings}

    def embedding_scale(self, cfg):
        return cfg.hidden_size ** 0.5          # transformers' Gemma2TextScaledWordEmbedding

    def from_checkpoint(self, cfg, name, tensor):
        return 1.0 + tensor.float() if _is_norm(name) else tensor

    def to_checkpoint(self, cfg, weights):
        return {k: (v.float() - 1.0) if _is_norm(k) else v for k, v in weights.items()}
