"""python -m bench.preset_run NAME -- BUILD_ENGINES_ARGS...: register an extra preset shape (defined here,
not in kvplan) into kvplan.models.presets.PRESETS, then run `python -m build.engines` in this process."""
from __future__ import annotations

import sys

from kvplan.config import DecoderConfig

EXTRA_PRESETS = {
    # Llama-3.2-1B's decoder shape (tied embeddings are not part of the decoder export):
    # 16 x 60.8 M = 973 M decoder parameters, 1.95 GB in fp16: above the exporter's 1.8 GB
    # external-data threshold.
    "llama3.2-1b-shape": DecoderConfig(
        hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8,
        head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        vocab_size=128256, family="llama"),
    # Llama-3.2-3B's decoder shape: 28 x 100.7 M = 2.82 G parameters, 5.6 GB in fp16.
    "llama3.2-3b-shape": DecoderConfig(
        hidden_size=3072, intermediate_size=8192, num_layers=28, num_heads=24, num_kv_heads=8,
        head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
        vocab_size=128256, family="llama"),
}


def decoder_params(cfg: DecoderConfig) -> int:
    h, i, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return cfg.num_layers * (h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h) + h


def main() -> int:
    name, sep, *rest = sys.argv[1:]
    assert sep == "--"
    from kvplan.models import presets
    presets.PRESETS[name] = EXTRA_PRESETS[name]
    from kvplan.target import main as engines_main
    return engines_main(rest)


if __name__ == "__main__":
    sys.exit(main())
