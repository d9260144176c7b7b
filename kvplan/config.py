"""The architecture of a Llama-family decoder stack, as kvplan needs it.

One frozen dataclass describes every supported family; families differ only by
small switches (q/k/v bias, per-head q/k norm), so a new family is a new
mapping from its config.json, not a new model class.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, asdict
from typing import Any

from kvplan.errors import ConfigError


ROPE_TYPES = ("default", "linear", "llama3")


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
    # Extra rope-scaling parameters ("factor", "low_freq_factor", ...), as a sorted tuple
    # of pairs so the dataclass stays hashable and comparable.
    rope_params: tuple[tuple[str, float], ...] = ()
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 4096
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    vocab_size: int = 0
    tie_word_embeddings: bool = False
    family: str = "llama"

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
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

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def rope(self) -> dict[str, float]:
        return dict(self.rope_params)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["rope_params"] = dict(self.rope_params)
        return d

    def weight_count(self) -> int:
        """Parameters of the decoder layers and final norm (what an export carries)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        q, kv = self.num_heads * d, self.num_kv_heads * d
        per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
        if self.qkv_bias:
            per_layer += q + 2 * kv
        if self.qk_norm:
            per_layer += 2 * d
        return self.num_layers * per_layer + h


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
    return base, 1.0


_FAMILY_SWITCHES = {
    # family: (q/k/v bias default, per-head q/k norm)
    "llama": (None, False),
    "mistral": (False, False),
    "qwen2": (True, False),
    "qwen3": (None, True),
}
SUPPORTED_FAMILIES = tuple(_FAMILY_SWITCHES)


def from_hf_dict(cfg: dict[str, Any], source: str, family: str | None = None) -> DecoderConfig:
    """Map a Hugging Face config.json dict of a Llama-family decoder to a DecoderConfig.

    ``source`` names the file in error messages.
    """
    family = family or cfg.get("model_type")
    if family not in _FAMILY_SWITCHES:
        raise ConfigError(
            f"{source}: model_type {family!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_FAMILIES)}, and MiniCPM-o-2_6 checkpoints)")

    def need(key: str) -> Any:
        if key not in cfg:
            raise ConfigError(f"{source}: missing field {key!r}")
        return cfg[key]

    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"{source}: hidden_act {act!r} is not supported (kvplan's MLP is SwiGLU with silu)")
    hidden = int(need("hidden_size"))
    heads = int(need("num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)

    # transformers 5 moved rope settings into rope_parameters; 4.x used rope_theta + rope_scaling.
    rope = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
    theta = float(rope.pop("rope_theta", cfg.get("rope_theta", 10000.0)))
    partial = float(rope.pop("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)))
    rope_params = tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, (int, float)) and not isinstance(v, bool)))

    bias_default, qk_norm = _FAMILY_SWITCHES[family]
    if bias_default is None:
        qkv_bias = bool(cfg.get("attention_bias", False))
        o_bias = qkv_bias if family == "llama" else False
    else:
        qkv_bias, o_bias = bias_default, False
    try:
        return DecoderConfig(
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_params=rope_params,
            partial_rotary_factor=partial,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            qkv_bias=qkv_bias,
            o_bias=o_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=qk_norm,
            vocab_size=int(cfg.get("vocab_size", 0)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            family=family,
        )
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def to_hf_dict(cfg: DecoderConfig) -> dict[str, Any]:
    """The config.json a Hugging Face model of this architecture would carry (tests and fixtures)."""
    d: dict[str, Any] = {
        "model_type": cfg.family,
        "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                           "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[cfg.family]],
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "vocab_size": cfg.vocab_size or 32000,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
    }
    if cfg.rope_type != "default":
        d["rope_scaling"] = {"rope_type": cfg.rope_type, **cfg.rope}
    if cfg.family in ("llama", "qwen3"):
        d["attention_bias"] = cfg.qkv_bias
    if cfg.family == "llama":
        d["mlp_bias"] = cfg.mlp_bias
    return d
