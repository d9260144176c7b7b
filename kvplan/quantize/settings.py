"""The ``[quantize]`` settings of a build profile, as data: defined here, below the profile
loader (kvplan.profiles parses and checks them), so the quantizer never imports the loader."""
from __future__ import annotations

from dataclasses import dataclass

QUANTIZE_METHODS = ("none", "rtn", "awq")
QUANTIZE_BITS = (4,)
GROUP_SIZES = (32, 64, 128)
# The calibration settings that name no file (kvplan.quantize.calibration).
CALIBRATION_WORDS = ("auto", "self", "synthetic")
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Compute capabilities TensorRT-RTX cannot compile int4 weight-only layers for.
NO_INT4_CCS = ("7.5",)


@dataclass(frozen=True)
class Quantize:
    """``[quantize]``: int4 weight-only quantization of the decoder's linears (kvplan.quantize).

    ``calibration`` (awq): "auto", "self", "synthetic", "text:FILE" (or a ``.txt`` path), or a
    safetensors file holding ``hidden_states`` or ``input_ids`` (files relative to the profile's
    directory); ``samples`` x ``tokens`` of it are used (kvplan.quantize.calibration).
    """
    method: str = "none"
    bits: int = 4
    group_size: int = 128
    linears: tuple[str, ...] = LINEARS
    calibration: str = "auto"
    samples: int = 8
    tokens: int = 128
    seed: int = 0
    clip: bool = True

    @property
    def enabled(self) -> bool:
        return self.method != "none"
