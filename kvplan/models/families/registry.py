"""The model-family registry: one module per family, each registering a :class:`Family`.

A family holds everything kvplan knows about one ``model_type``: how its config.json maps
to a :class:`DecoderConfig` (and which of its features are refused, with the reason),
which transformers classes are the independent reference, how checkpoint tensors map to
kvplan's (split fused projections, folded norm gains) and back, and a tiny config the
tests run it at. Adding a family is one module in this package plus its tests.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from kvplan.config import DecoderConfig
from kvplan.errors import ConfigError
from kvplan.lazy import lazy_import

torch = lazy_import("torch")

FAMILIES: dict[str, "Family"] = {}


def register(cls: type["Family"]) -> type["Family"]:
    """Class decorator: make the family known under its ``name`` (config.json's model_type)."""
    family = cls()
    if family.name in FAMILIES:
        raise RuntimeError(f"family {family.name!r} registered twice")
    FAMILIES[family.name] = family
    return cls


def get(name: str, source: str = "config.json") -> "Family":
    if name not in FAMILIES:
        raise ConfigError(f"{source}: model_type {name!r} is not supported "
                          f"(supported: {', '.join(FAMILIES)}, and MiniCPM-o-2_6 checkpoints)")
    return FAMILIES[name]


class Fields:
    """Typed reads of a config.json dict; every error names the file and the field."""

    def __init__(self, hf: dict[str, Any], source: str):
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: not a JSON object")
        self.hf, self.source = hf, source

    def error(self, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {message}")

    def has(self, key: str) -> bool:
        return self.hf.get(key) is not None

    def int(self, key: str, default: int | None = None, positive: bool = False) -> int:
        value = self.hf.get(key)
        value = default if value is None else value
        if value is None:
            raise self.error(f"missing field {key!r}")
        # A float is taken when it is a whole number (64.0); NaN and infinity are not numbers of layers.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or value != int(value):
            raise self.error(f"{key} must be an integer, got {value!r}")
        if positive and value <= 0:
            raise self.error(f"{key} must be a positive integer, got {value!r}")
        return int(value)

    def float(self, key: str, default: float | None = None, positive: bool = False) -> float:
        value = self.hf.get(key)
        value = default if value is None else value
        if value is None:
            raise self.error(f"missing field {key!r}")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(f"{key} must be a finite number, got {value!r}")
        if positive and value <= 0:
            raise self.error(f"{key} must be a positive number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: bool = False) -> bool:
        value = self.hf.get(key, default)
        if value is None:
            return default
        # bool("false") is True: a string or number here is refused, not read as a switch.
        if not isinstance(value, bool):
            raise self.error(f"{key} must be true or false, got {value!r}")
        return value

    def rope(self) -> dict[str, Any]:
        """rope_type, rope_theta, partial_rotary_factor and the scaling parameters, from
        transformers 5's ``rope_parameters`` or 4.x's ``rope_theta`` + ``rope_scaling``."""
        rope = self.hf.get("rope_parameters") or self.hf.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise self.error(f"rope_parameters must be an object, got {rope!r}")
        rope = dict(rope)
        rope_type = rope.pop("rope_type", None) or rope.pop("type", None) or "default"
        theta = rope.pop("rope_theta", self.hf.get("rope_theta", 10000.0))
        partial = rope.pop("partial_rotary_factor", self.hf.get("partial_rotary_factor", 1.0))
        params = {}
        for k, v in rope.items():
            if isinstance(v, list) and all(isinstance(x, (int, float)) for x in v):
                params[k] = tuple(float(x) for x in v)
            elif isinstance(v, (int, float)) and not isinstance(v, bool):
                params[k] = float(v)
        # Named as config.json spells them, wherever in it they were found.
        values = Fields({"rope_theta": theta, "partial_rotary_factor": partial}, self.source)
        return {"rope_type": rope_type, "rope_theta": values.float("rope_theta", positive=True),
                "partial_rotary_factor": values.float("partial_rotary_factor", positive=True),
                "rope_params": params}


class Family:
    """One model family. Subclasses set the class attributes and override what differs."""
    name: str = ""
    # transformers' decoder class and its causal-LM class: the independent reference.
    reference_classes: tuple[str, str] = ("", "")
    # The MLP activations this family's checkpoints may name.
    activations: tuple[str, ...] = ("silu",)
    # config.json's key for the activation.
    act_key: str = "hidden_act"
    # The rope scaling types this family's checkpoints may name.
    rope_types: tuple[str, ...] = ("default", "linear", "llama3")
    # transformers' config-class defaults for the fields kvplan reads, where they differ from
    # kvplan's: a config.json that leaves a field out means the class default.
    defaults: dict[str, Any] = {}

    @property
    def tiny(self) -> DecoderConfig:
        """A tiny config of this family for tests (every switch the family uses, set)."""
        raise NotImplementedError

    # --- config.json -> DecoderConfig -------------------------------------------------
    def config(self, hf: dict[str, Any], source: str) -> DecoderConfig:
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: not a JSON object")
        f = Fields({**self.defaults, **hf}, source)
        kwargs = self.common(f)
        kwargs.update(self.switches(f, kwargs))
        try:
            return DecoderConfig(**kwargs)
        except ConfigError as e:
            raise f.error(str(e)) from None

    def common(self, f: Fields) -> dict[str, Any]:
        """The fields every Llama-family config.json spells the same way."""
        act = f.hf.get(self.act_key, self.activations[0])
        if act not in self.activations:
            raise f.error(f"{self.act_key} {act!r} is not supported for {self.name} "
                          f"(supported: {', '.join(self.activations)})")
        hidden, heads = f.int("hidden_size", positive=True), f.int("num_attention_heads", positive=True)
        if not f.has("head_dim") and hidden % heads:
            raise f.error(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}, and no "
                          f"head_dim says the head size")
        rope = f.rope()
        self.check_rope(f, rope)
        return dict(
            hidden_size=hidden, intermediate_size=f.int("intermediate_size", positive=True),
            num_layers=f.int("num_hidden_layers", positive=True), num_heads=heads,
            num_kv_heads=f.int("num_key_value_heads", heads, positive=True),
            head_dim=f.int("head_dim", hidden // heads, positive=True),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6, positive=True),
            rope_theta=rope["rope_theta"], rope_type=rope["rope_type"],
            rope_params=tuple(sorted(rope["rope_params"].items())),
            partial_rotary_factor=rope["partial_rotary_factor"],
            max_position_embeddings=f.int("max_position_embeddings", 4096, positive=True),
            vocab_size=f.int("vocab_size", 0), tie_word_embeddings=f.bool("tie_word_embeddings"),
            hidden_act=act, family=self.name)

    def check_rope(self, f: Fields, rope: dict[str, Any]) -> None:
        """Refuse a rope scaling kvplan does not implement, or one missing the parameters it needs."""
        kind = rope["rope_type"]
        if kind not in self.rope_types:
            raise f.error(f"rope_scaling type {kind!r} is not supported for {self.name} "
                          f"(supported: {', '.join(self.rope_types)})")
        if kind in ("linear", "llama3"):
            factor = rope["rope_params"].get("factor")
            if not isinstance(factor, float) or factor <= 0:
                raise f.error(f"rope_scaling type {kind!r} needs a positive 'factor', got {factor!r}")

    def switches(self, f: Fields, common: dict[str, Any]) -> dict[str, Any]:
        """This family's DecoderConfig fields (biases, norms, ...); refuses what it cannot export."""
        return {}

    # --- DecoderConfig -> config.json (presets' reference, test checkpoints) ----------
    def hf_config(self, cfg: DecoderConfig) -> dict[str, Any]:
        d: dict[str, Any] = {
            "model_type": self.name, "architectures": [self.reference_classes[1]],
            "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
            "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
            "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "max_position_embeddings": cfg.max_position_embeddings,
            "vocab_size": cfg.vocab_size or 32000, "tie_word_embeddings": cfg.tie_word_embeddings,
            self.act_key: cfg.hidden_act,
        }
        if cfg.rope_type != "default":
            d["rope_scaling"] = {"rope_type": cfg.rope_type,
                                 **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.rope.items()}}
        if cfg.partial_rotary_factor != 1.0:
            d["partial_rotary_factor"] = cfg.partial_rotary_factor
        return d

    # --- the embedding (the graph's hidden_in is its output) -----------------------------
    def embedding_scale(self, cfg: DecoderConfig) -> float:
        """What the family multiplies the embedding rows by before the first layer."""
        return 1.0

    # --- checkpoint tensors <-> kvplan's ------------------------------------------------
    def checkpoint_name(self, cfg: DecoderConfig, name: str) -> str:
        """The checkpoint tensor (no ``model.`` prefix) kvplan's tensor ``name`` is made from."""
        return name

    def from_checkpoint(self, cfg: DecoderConfig, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """kvplan's tensor ``name`` from its checkpoint tensor."""
        return tensor

    def to_checkpoint(self, cfg: DecoderConfig, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The checkpoint's tensors from a complete set of kvplan's (the inverse mapping)."""
        return dict(weights)


def reader(family: Family, cfg: DecoderConfig,
           read_checkpoint: Callable[[list[str]], dict[str, torch.Tensor]]) -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """``read_tensors`` in kvplan's names over a reader of checkpoint names: each checkpoint
    tensor is read once, however many of kvplan's tensors are cut from it."""
    def read(names: list[str]) -> dict[str, torch.Tensor]:
        sources = {n: family.checkpoint_name(cfg, n) for n in names}
        got = read_checkpoint(sorted(set(sources.values())))
        return {n: family.from_checkpoint(cfg, n, got[sources[n]]) for n in names}
    return read


def window(f: Fields, size: int | None, sliding: list[bool], max_positions: int) -> int:
    """DecoderConfig.sliding_window for a model whose layers ``sliding`` (one flag a layer)
    attend to the last ``size`` positions.

    Honoured when every layer slides: the runtime's additive mask expresses the window (the
    graph takes any mask). Some layers sliding and others not cannot be expressed by the one
    mask every layer shares, so that is refused, unless the window is at least the model's
    max positions: then no position ever falls out of it and it is harmless.
    """
    if not size or not any(sliding):
        return 0
    if all(sliding):
        return size
    if size >= max_positions:
        return 0
    raise f.error(f"sliding_window {size} on {sum(sliding)} of {len(sliding)} layers is not supported: "
                  "kvplan's layers share one attention mask, so a window on some layers only cannot be "
                  f"expressed (a window of at least max_position_embeddings = {max_positions} would be harmless)")


def layer_types(f: Fields, num_layers: int, default: list[str]) -> list[bool]:
    """Which layers slide, from config.json's ``layer_types`` or the family's default."""
    types = f.hf.get("layer_types") or default
    if not isinstance(types, list) or len(types) != num_layers:
        raise f.error(f"layer_types must list one type for each of the {num_layers} layers")
    unknown = sorted(set(types) - {"full_attention", "sliding_attention"})
    if unknown:
        raise f.error(f"layer_types {unknown[0]!r} is not supported (full_attention, sliding_attention)")
    return [t == "sliding_attention" for t in types]
