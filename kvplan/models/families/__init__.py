"""Model families, one module each, registered in ``registry.FAMILIES`` by ``@register``.

Importing this package imports every family module, so the registry is complete.
"""
from __future__ import annotations

from kvplan.config import DecoderConfig
from kvplan.errors import ConfigError
from kvplan.models.families import gemma2, llama, mistral, phi3, qwen2, qwen3  # noqa: F401  (they register themselves)
from kvplan.models.families.registry import FAMILIES, Family, get, reader


def from_hf_dict(hf: dict, source: str, family: str | None = None) -> DecoderConfig:
    """The DecoderConfig of a config.json dict (``source`` names the file in errors)."""
    if not isinstance(hf, dict):
        raise ConfigError(f"{source}: not a JSON object")
    return get(family or hf.get("model_type"), source).config(hf, source)


def hf_config_dict(cfg: DecoderConfig) -> dict:
    """The config.json a Hugging Face checkpoint of this architecture carries (presets, tests)."""
    return get(cfg.family).hf_config(cfg)


__all__ = ["FAMILIES", "Family", "get", "reader", "from_hf_dict", "hf_config_dict"]
