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
from polygraphy.comparator import RunResults

from kvplan.quantize.weights import Quantized, dequantized_source
from kvplan.validate import runners as rn
from kvplan.validate.onnx_stack import OnnxStack, Pack
from kvplan.validate.reference import HFReference
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


def quality_rows_from_files(vdir: Path, base: str, points, graph_runner: str) -> list[dict]:
    """quality_rows over the Polygraphy output files validation streamed for one group of points."""
    results = [(name, RunResults.load(str(vdir / f"{base}.outputs.{name}.json"))[0][1])
               for name in (graph_runner, QUALITY_RUNNER)]
    return quality_rows(results, points, graph_runner)


def quality_rows(results, points, graph_runner: str) -> list[dict]:
    """Per point: relative error ||int4 - fp|| / ||fp|| of hidden_out (the int4 graph against the
    full-precision model, both fed the same inputs)."""
    by_name = dict(results)
    rows = []
    for point, got, ref in zip(points, by_name[graph_runner], by_name[QUALITY_RUNNER]):
        g = np.asarray(got["hidden_out"], dtype=np.float64)
        r = np.asarray(ref["hidden_out"], dtype=np.float64)
        rel = float(np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30))
        rows.append({"point": point.label, "hidden_out_rel_error": round(rel, 5),
                     "within_reported_bar": rel <= QUALITY_REL_ERROR})
    return rows


def quality_task(original, dtype, specs, graphs, options, prompt, tolerance, log) -> dict:
    """Teacher-forced greedy token agreement of the int4 graph against the full-precision model."""
    stack = OnnxStack([Pack(s, p) for s, p in zip(specs, graphs)])
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
