"""Built-in architectures with seeded random weights: always available, no download."""
from __future__ import annotations

import hashlib

from kvplan import stack
from kvplan.config import DecoderConfig
from kvplan.lazy import lazy_import
from kvplan.models.base import LM_NAMES, ConfigOrigin, ModelError, ModelSource, reference_names
from kvplan.models.families import FAMILIES
from kvplan.models.families import get as get_family

torch = lazy_import("torch")

DEFAULT = "minicpmo26-tts"

PRESETS: dict[str, DecoderConfig] = {
    # MiniCPM-o 2.6's TTS decoder (model.tts.model): a LlamaModel built from
    # tts_config with LlamaConfig's defaults for everything tts_config leaves out.
    "minicpmo26-tts": DecoderConfig(
        hidden_size=768, intermediate_size=3072, num_layers=20, num_heads=12, num_kv_heads=12,
        head_dim=64, rms_norm_eps=1e-6, rope_theta=10000.0, max_position_embeddings=4096,
        vocab_size=32000, family="llama"),
    # Every registered family's tiny test config: tiny-llama (GQA), tiny-qwen2 (q/k/v bias),
    # tiny-qwen3 (per-head q/k norm), tiny-mistral (sliding window), ...
    **{f"tiny-{name}": family.tiny for name, family in FAMILIES.items()},
    # Llama with a few large-magnitude activation channels (as trained LLMs have: OUTLIERS below),
    # where activation-aware quantization (AWQ) measurably beats round to nearest.
    "tiny-llama-outliers": DecoderConfig(
        hidden_size=128, intermediate_size=384, num_layers=2, num_heads=4, num_kv_heads=4,
        head_dim=32, rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
        vocab_size=256, family="llama"),
    # Qwen2-0.5B's shape, for benchmarks.
    "qwen2-0.5b-shape": DecoderConfig(
        hidden_size=896, intermediate_size=4864, num_layers=24, num_heads=14, num_kv_heads=2,
        head_dim=64, rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=32768,
        qkv_bias=True, vocab_size=151936, family="qwen2"),
    # Llama-3.2-1B's shape (llama3 rope scaling, tied embeddings), for validation at scale;
    # profiles clip its 131072 positions.
    "llama3.2-1b-shape": DecoderConfig(
        hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, rope_type="llama3",
        rope_params=(("factor", 32.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                     ("original_max_position_embeddings", 8192)),
        max_position_embeddings=131072, vocab_size=128256, tie_word_embeddings=True, family="llama"),
}

SEED = 20261125
# preset: (channels, gain): the norm gains of that many hidden channels are that large, so the
# normalised inputs of q/k/v and gate/up carry a few outlier channels.
OUTLIERS = {"tiny-llama-outliers": (4, 30.0)}


def accepts(arg: str) -> bool:
    return arg in PRESETS


def _seed_for(name: str) -> int:
    # Per-tensor seeds: a pack reads its own tensors and gets the same values as a
    # full-stack read, whatever order they are asked for in.
    return (SEED + int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")) % 2**31


def random_tensor(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    # In place: the same two roundings as ``1.0 + 0.1 * x``, without a second tensor of the size
    # (an embedding of a 152k-row vocabulary is 520 MiB in float32).
    t = torch.randn(shape, generator=torch.Generator().manual_seed(_seed_for(name)))
    if name.endswith("norm.weight"):
        # Norm gains near 1, as trained models have.
        return t.mul_(0.1).add_(1.0)
    return t.mul_(0.02)


def _with_outliers(preset: str, name: str, t: torch.Tensor) -> torch.Tensor:
    if preset not in OUTLIERS or not name.endswith("layernorm.weight"):
        return t
    count, gain = OUTLIERS[preset]
    channels = torch.randperm(t.shape[0], generator=torch.Generator().manual_seed(SEED))[:count]
    t[channels] *= gain
    return t


def tensor_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """HF names and shapes of the decoder's tensors (no ``model.`` prefix)."""
    return stack.tensor_shapes(cfg)


def load(name: str) -> ModelSource:
    if name not in PRESETS:
        raise ModelError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
    cfg = PRESETS[name]
    shapes = tensor_shapes(cfg)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        unknown = [n for n in names if n not in shapes]
        if unknown:
            raise ModelError(f"preset {name}: no tensor {unknown[0]!r}")
        return {n: _with_outliers(name, n, random_tensor(n, shapes[n])) for n in names}

    def read_lm(names=LM_NAMES) -> dict[str, torch.Tensor]:
        return {n: random_tensor(n, (cfg.vocab_size, cfg.hidden_size)) for n in names}

    family = get_family(cfg.family)
    return ModelSource(name=name, config=cfg, kind="preset", read_tensors=read, read_lm=read_lm,
                       read_embedding=lambda: read_lm(["embed_tokens.weight"])["embed_tokens.weight"],
                       embedding="embed_tokens.weight",
                       fingerprint={"preset": name, "seed": SEED, "config": cfg.to_dict()},
                       reference_config=family.hf_config(cfg), origin=ConfigOrigin(f"preset {name}"),
                       read_reference=lambda layers=None, norm=True: family.to_checkpoint(
                           cfg, read(reference_names(shapes, layers, norm))))
