"""The quantize stage's import of a pre-quantized checkpoint's own int4 values (the source,
kvplan.models.quantized_dir, reads and checks the checkpoint; nothing is requantized)."""
from __future__ import annotations

from typing import Callable

from kvplan.models.quantized_dir import Checkpoint
from kvplan.quantize.weights import Quantized


def imported(ckpt: Checkpoint, log: Callable[[str], None] = print) -> Quantized:
    """Every quantized linear of the checkpoint in its int4 form, layer by layer."""
    out = Quantized(record={"method": f"import-{ckpt.method}", "group_size": ckpt.group_size,
                            "checkpoint": str(ckpt.directory), "quantization_config": ckpt.config})
    for layer in range(ckpt.cfg.num_layers):
        for name in ckpt.quantized_names:
            if name.startswith(f"layers.{layer}."):
                out.linears[name] = ckpt.linear(name)
        log(f"[quantize] {ckpt.method} checkpoint: layer {layer + 1}/{ckpt.cfg.num_layers} read")
    return out
