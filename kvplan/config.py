"""The architecture of a Llama-family decoder stack, as kvplan needs it.

One frozen dataclass describes every supported family; families differ only by
switches (biases, per-head q/k norm, the MLP's activation, Gemma 2's sandwich norms,
attention scale and soft-capping, partial rotary, rope scaling). Which family sets
which switch from its config.json lives in that family's module
(kvplan/models/families/), not here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from kvplan.errors import ConfigError

# The seven linears of a Llama-family layer, under their module's path in the layer.
LINEAR_MODULES = {"q_proj": "self_attn.q_proj", "k_proj": "self_attn.k_proj", "v_proj": "self_attn.v_proj",
                  "o_proj": "self_attn.o_proj", "gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                  "down_proj": "mlp.down_proj"}

ROPE_TYPES = ("default", "linear", "llama3", "longrope")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


@dataclass(frozen=True)
class DecoderConfig:
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Extra rope-scaling parameters ("factor", "low_freq_factor", longrope's "short_factor"
    # list as a tuple, ...), as a sorted tuple of pairs so the dataclass stays hashable.
    rope_params: tuple[tuple[str, int | float | tuple[float, ...]], ...] = ()
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    family: str = "llama"
    # The MLP is act(gate(x)) * up(x): SwiGLU ("silu") or GeGLU with tanh-gelu (Gemma).
    hidden_act: str = "silu"
    # Gemma 2's layer: a norm after attention and one before and after the MLP.
    sandwich_norm: bool = False
    # The scale of Q K^T; 0 means head_dim ** -0.5 (Gemma 2: query_pre_attn_scalar ** -0.5).
    attn_scale: float = 0.0
    # Attention logit soft-capping (Gemma 2): scores = cap * tanh(scores / cap) before the mask.
    attn_softcap: float = 0.0
    # Every layer attends to the last `sliding_window` positions only (0: no window). The
    # graph is the same either way: the runtime's additive mask expresses the window
    # (kvplan.export.causal_mask(window=...) writes such masks), so this records it for the
    # runtime and for validation.
    sliding_window: int = 0
    # Soft-capping of the LM head's logits, cap * tanh(logits / cap) (Gemma 2's
    # final_logit_softcapping; 0: none). Not in the decoder graph: what eval and the head apply.
    logit_softcap: float = 0.0

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        for name, lowest in (("max_position_embeddings", 1), ("vocab_size", 0), ("sliding_window", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < lowest:
                raise ConfigError(f"{name} must be an integer >= {lowest}, got {value!r}")
        # Each of these is divided by, raised to a power or taken a root of: zero, a negative or a
        # non-finite value would export NaN or fail deep in the export.
        for name in ("rms_norm_eps", "rope_theta"):
            value = getattr(self, name)
            if not _finite(value) or value <= 0:
                raise ConfigError(f"{name} must be a positive finite number, got {value!r}")
        for name in ("attn_scale", "attn_softcap", "logit_softcap"):
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_scaling type {self.rope_type!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
        if not 0 < self.partial_rotary_factor <= 1:
            raise ConfigError(f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}")
        if self.rotary_dim % 2:
            raise ConfigError(f"rotary dimension {self.rotary_dim} must be even")
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (supported: {', '.join(ACTIVATIONS)})")

    @property
    def scale(self) -> float:
        """The factor Q K^T is multiplied by."""
        return self.attn_scale or self.head_dim ** -0.5

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope(self) -> dict[str, float]:
        return dict(self.rope_params)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.rope_params}
        return d

    def weight_count(self) -> int:
        """Parameters of the decoder layers and final norm (what an export carries)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.o_bias:
            per_layer += h
        if self.mlp_bias:
            per_layer += 2 * i + h
        if self.qk_norm:
            per_layer += 2 * d
        if self.sandwich_norm:
            per_layer += 2 * h
        return self.num_layers * per_layer + h


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def inv_freq(cfg: DecoderConfig) -> tuple[list[float], float]:
    """Rotary inverse frequencies and the attention scaling factor, per the config's rope type.

    Returned as plain floats (computed in float64) so the torch module and tests agree
    on one definition.
    """
    dim = cfg.rotary_dim
    base = [1.0 / (cfg.rope_theta ** (i / dim)) for i in range(0, dim, 2)]
    params = cfg.rope
    if cfg.rope_type == "linear":
        factor = params["factor"]
        return [f / factor for f in base], 1.0
    if cfg.rope_type == "llama3":
        factor = params["factor"]
        low, high = params.get("low_freq_factor", 1.0), params.get("high_freq_factor", 4.0)
        old_ctx = params.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
        out = []
        for f in base:
            wavelen = 2 * math.pi / f
            if wavelen > low_wavelen:
                out.append(f / factor)
            elif wavelen < high_wavelen:
                out.append(f)
            else:
                smooth = (old_ctx / wavelen - low) / (high - low)
                out.append((1 - smooth) * f / factor + smooth * f)
        return out, 1.0
    if cfg.rope_type == "longrope":
        return _longrope(base, params)
    return base, 1.0


def _longrope(base: list[float], params: dict) -> tuple[list[float], float]:
    """LongRoPE with its short factors (positions up to original_max_position_embeddings).

    transformers switches to the long factors when a step's largest position passes
    original_max_position_embeddings; a graph with fixed frequencies cannot, so the
    families that use longrope cap the model's positions there (kvplan/models/families/phi3.py).
    ``factor`` is the context extension (max / original max positions), set by the family.
    """
    short = params["short_factor"]
    factor, original = params["factor"], params["original_max_position_embeddings"]
    scaling = params.get("attention_factor") or (
        1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original)))
    return [f / s for f, s in zip(base, short)], scaling
