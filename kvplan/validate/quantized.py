"""Validation of int4 targets: two separate questions.

Faithfulness (pass/fail, the ordinary validation): the int4 graph in ONNX Runtime (accuracy
level 0, kvplan.runtime.ort_session) against transformers carrying the *same* dequantized
weights (the quantize stage's ``quantized.safetensors``), at the profile's fp16-rounding
tolerances, every point, masked slots included. A wrong packing order or a misplaced scale
fails it.

Quality (reported, not a verdict): the int4 model against the full-precision model.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kvplan.quantize.weights import Quantized, dequantized_source
from kvplan.validate import runners as rn
from kvplan.validate.onnx_stack import OnnxStack, Pack
from kvplan.validate.points import as_float32
from kvplan.validate.reference import HFReference
from kvplan.validate.stream import Measure
from kvplan.validate.task import run_task_checks


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


QUALITY_RUNNER = "pytorch-fp"
# A loose, reported-only bar: int4 weight-only typically moves a decoder's hidden states by a
# few percent of their norm (RTN on the default model's random weights: about 5 %); above 25 %
# the quantization is broken rather than coarse. Not part of the verdict.
QUALITY_REL_ERROR = 0.25


def full_precision_reference(original, dtype, layers=None, norm: bool = True, round_to=None) -> HFReference:
    return HFReference(original, dtype, layers=layers, norm=norm, round_to=round_to)


def quality_runner(reference: HFReference, spec, contract, log, out_dtype=None):
    """transformers on the full-precision weights, run next to the int4 graph on the same inputs."""
    return rn.ReferenceRunner(reference, spec, contract, name=QUALITY_RUNNER, log=log, out_dtype=out_dtype)


def _relative_error(full_precision, int4) -> float:
    r, g = as_float32(full_precision).astype(np.float64), as_float32(int4).astype(np.float64)
    return float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))


def quality_measure(graph_runner: str) -> Measure:
    """Relative error ||int4 - fp|| / ||fp|| of hidden_out, the int4 graph against the
    full-precision model fed the same inputs: taken as the graph runs each point, from the
    full-precision model's hidden_out alone (not from the Polygraphy files, which hold every
    KV tensor of every point)."""
    return Measure(QUALITY_RUNNER, graph_runner, "hidden_out", _relative_error)


def quality_row(label: str, rel: float) -> dict:
    return {"point": label, "hidden_out_rel_error": round(rel, 5), "within_reported_bar": rel <= QUALITY_REL_ERROR}


def quality_task(original, dtype, specs, graphs, options, prompt, tolerance, log) -> dict:
    """Teacher-forced greedy token agreement of the int4 graph against the full-precision model."""
    # Many small steps: the default level, whose MatMulNBits reads the int4 weights as they are (at
    # the basic level every weight is dequantized at every step: 72 s against about 6 s here).
    stack = OnnxStack([Pack(s, p) for s, p in zip(specs, graphs)], fold_casts=True)
    return run_task_checks(original, dtype, {rn.EXPORT: stack}, options.steps, prompt, tolerance, log)


def summary(method: str, rows: list[dict], task: dict) -> list[str]:
    lines = [f"quality ({method} int4 against the full-precision model; reported, not part of the verdict, "
             f"bar {QUALITY_REL_ERROR:.0%} relative error):"]
    for r in rows:
        lines.append(f"  {r['point']:36s} hidden_out relative error {100 * r['hidden_out_rel_error']:.2f}%")
    if task.get("ran"):
        r = task["stacks"][rn.EXPORT]
        if r.get("ran"):
            lines.append(f"  token agreement {100 * r['agreement']:.1f}% over {task['steps']} teacher-forced steps "
                         f"(first divergence: {r['first_divergence']})")
    return lines
