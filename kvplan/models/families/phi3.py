"""Phi-3 and Phi-4-mini (model_type phi3): Llama's layer with fused projections, partial
rotary and LongRoPE.

- ``qkv_proj`` ([q + 2 kv rows, hidden]) and ``gate_up_proj`` ([2 intermediate, hidden]) are
  split into kvplan's q/k/v and gate/up tensors when read (and fused again for a preset's
  reference), so the graph is the Llama one.
- ``partial_rotary_factor`` (Phi-4-mini: 0.75): the rotary covers the first part of each head.
- ``longrope``: transformers uses the short factors while a step's largest position is below
  ``original_max_position_embeddings`` and the long factors past it, a switch a graph with
  fixed frequencies does not make. kvplan exports the short factors (with LongRoPE's attention
  factor, from the context extension ``factor``) and caps the model's positions at
  original_max_position_embeddings; a profile beyond it is refused when it loads.
- ``sliding_window`` (Phi-3-mini-4k: 2047) slides every layer: honoured through the mask.
"""
from __future__ import annotations

import re

from kvplan.config import DecoderConfig
from kvplan.lazy import lazy_import
from kvplan.models.families.registry import Family, Fields, register, window

torch = lazy_import("torch")

_QKV = re.compile(r"(layers\.\d+\.self_attn\.)([qkv])_proj\.weight$")
_GATE_UP = re.compile(r"(layers\.\d+\.mlp\.)(gate|up)_proj\.weight$")


def _rows(cfg: DecoderConfig, name: str) -> tuple[str, int, int] | None:
    """(fused checkpoint tensor, first row, end row) of one of kvplan's split tensors."""
    if m := _QKV.match(name):
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        start = {"q": 0, "k": q, "v": q + kv}[m[2]]
        return m[1] + "qkv_proj.weight", start, start + (q if m[2] == "q" else kv)
    if m := _GATE_UP.match(name):
        i = cfg.intermediate_size
        start = 0 if m[2] == "gate" else i
        return m[1] + "gate_up_proj.weight", start, start + i
    return None


@register
class Phi3(Family):
    name = "phi3"
    reference_classes = ("Phi3Model", "Phi3ForCausalLM")
    rope_types = ("default", "longrope", "su", "yarn")     # su, yarn: Phi-3's early names for longrope
    # Phi3Config's defaults.
    defaults = {"rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "original_max_position_embeddings": 4096}

    @property
    def tiny(self) -> DecoderConfig:
        # Phi-4-mini's kind: GQA, partial rotary 0.75, longrope with a 32x context extension.
        rotary_half = 6
        return DecoderConfig(
            hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=16,
            rms_norm_eps=1e-5, rope_theta=10000.0, rope_type="longrope", partial_rotary_factor=0.75,
            rope_params=(("factor", 32.0),
                         ("long_factor", tuple(1.0 + 2.0 * j for j in range(rotary_half))),
                         ("original_max_position_embeddings", 4096),
                         ("short_factor", tuple(1.0 + 0.25 * j for j in range(rotary_half)))),
            max_position_embeddings=4096, vocab_size=256, family="phi3")

    def switches(self, f: Fields, common):
        out = {"sliding_window": window(f, f.int("sliding_window") if f.has("sliding_window") else None,
                                        [True] * common["num_layers"], common["max_position_embeddings"])}
        if common["rope_type"] in ("su", "yarn"):      # Phi-3's early names for longrope
            common["rope_type"] = out["rope_type"] = "longrope"
        if common["rope_type"] == "longrope":
            out.update(self._longrope(f, common))
        return out

    def _longrope(self, f: Fields, common) -> dict:
        params = dict(common["rope_params"])
        original = int(params.get("original_max_position_embeddings") or f.int("original_max_position_embeddings"))
        max_positions = common["max_position_embeddings"]
        half = int(common["head_dim"] * common["partial_rotary_factor"]) // 2
        for key in ("short_factor", "long_factor"):
            if not isinstance(params.get(key), tuple) or len(params[key]) != half:
                raise f.error(f"rope_scaling.{key} must list {half} numbers (half the rotary dimension)")
        params["original_max_position_embeddings"] = float(original)
        params.setdefault("factor", max_positions / original)
        return {"rope_params": tuple(sorted(params.items())), "max_position_embeddings": min(max_positions, original)}

    def hf_config(self, cfg):
        # Phi3Config's pad and eos tokens (32000) would not fit a small vocabulary.
        d = super().hf_config(cfg) | {"sliding_window": cfg.sliding_window or None, "pad_token_id": None,
                                      "eos_token_id": None}
        if cfg.rope_type == "longrope":
            d["original_max_position_embeddings"] = int(cfg.rope["original_max_position_embeddings"])
            d["rope_scaling"]["original_max_position_embeddings"] = d["original_max_position_embeddings"]
        return d

    def checkpoint_name(self, cfg, name):
        rows = _rows(cfg, name)
        return rows[0] if rows else name

    def from_checkpoint(self, cfg, name, tensor):
        rows = _rows(cfg, name)
        return tensor[rows[1]:rows[2]] if rows else tensor

    def to_checkpoint(self, cfg, weights):
        out, fused = {}, {}
        for name, t in weights.items():
            rows = _rows(cfg, name)
            if rows:
                fused.setdefault(rows[0], []).append((rows[1], t))
            else:
                out[name] = t
        for name, parts in fused.items():
            out[name] = torch.cat([t for _, t in sorted(parts, key=lambda p: p[0])])
        return out
