"""Validation of int4 targets: two separate questions.

Faithfulness (pass/fail, the ordinary validation): the int4 graph in ONNX Runtime (accuracy
level 0, kvplan.validate.ort_session) against transformers carrying the *same* dequantized
weights (the quantize stage's ``quantized.safetensors``), at the profile's fp16-rounding
tolerances, every point, masked slots included. A wrong packing order or a misplaced scale
fails it.

Quality (reported, not a verdict): the int4 model against the full-precision model.
"""
from __future__ import annotations

from pathlib import Path

from kvplan.quantize.weights import Quantized, dequantized_source


def quantize_record(manifest: dict) -> dict | None:
    return manifest.get("stages", {}).get("quantize")


def faithfulness_inputs(source, manifest: dict, target: Path, exported: list[Path] | None):
    """(reference source, graphs to compare as the exported stage) of a target: for an int4 target
    the dequantized-weights source and the int4 graphs; otherwise both unchanged."""
    record = quantize_record(manifest)
    if not record:
        return source, exported
    graphs = [target / a["path"] for a in sorted((a for a in record["artifacts"] if "pack" in a),
                                                  key=lambda a: a["pack"])]
    (weights,) = [target / a["path"] for a in record["artifacts"] if a.get("role") == "weights"]
    return dequantized_source(source, Quantized.load(weights)), graphs
