"""Pre-quantized checkpoints (AutoAWQ gemm, GPTQ): detected from config.json's quantization_config."""
from __future__ import annotations

from kvplan.models import resolve as resolve_model


def resolve(arg: str):
    """``kvplan.models.resolve``, or for a pre-quantized checkpoint directory its import."""
    return resolve_model(arg)
