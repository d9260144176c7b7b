"""int4 weight-only figures: quantize time and peak RSS, quality against full precision, sizes.

    python -m bench.quantize [--int4-target DIR] [--fp16-target DIR]

- Quality: relative error ||hidden_out(int4 weights) - hidden_out(full precision)|| / ||...||
  of the whole stack in fp32 PyTorch, on inputs the calibration never saw (64 tokens, seed 123),
  for RTN and AWQ, on the outlier preset and on the default model.
- Quantize time / peak RSS: each method in its own process (``ru_maxrss`` of that process).
- Sizes: ONNX and plan bytes read from built targets' manifests (``--int4-target``, ``--fp16-target``).
Results go to bench/results/quantize-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import ROOT, loadavg, log
from kvplan.decoder import DecoderStack, StackSpec
from kvplan.export import example_inputs
from kvplan.models import resolve
from kvplan.models.presets import tensor_shapes
from kvplan.profiles import Quantize
from kvplan.quantize.weights import Quantized, dequantized_source
from kvplan.quantize.awq import quantize_awq
from kvplan.quantize.stage import quantize_rtn

RESULTS = ROOT / "bench" / "results"
CASES = [("tiny-llama-outliers", 32), ("minicpmo26-tts", 128)]


def _child(model: str, method: str, group: int, weights: str | None) -> dict:
    """Runs in its own process: quantize (or load ``weights``), then measure the error."""
    source = resolve(model)
    cfg = source.config
    t0 = time.perf_counter()
    if weights:
        quantized = Quantized.load(Path(weights))
    else:
        run = quantize_rtn if method == "rtn" else quantize_awq
        quantized = run(source, Quantize(method=method, group_size=group), log=lambda m: log(m))
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    spec = StackSpec(0, cfg.num_layers, True)
    inputs = example_inputs(cfg, spec, 1, torch.float32, 64, 0, seed=123)

    def stack(src):
        s = DecoderStack(cfg, spec)
        s.load_state_dict(src.read_tensors(list(tensor_shapes(cfg))), strict=False)
        return s.eval()
    with torch.no_grad():
        ref = stack(source)(*inputs)[0]
        got = stack(dequantized_source(source, quantized))(*inputs)[0]
    return {"model": model, "method": method, "group_size": group,
            "quantize_s": None if weights else round(seconds, 1), "peak_rss_mib": None if weights else round(rss),
            "from": weights, "rel_error": round(float((got - ref).norm() / ref.norm()), 5)}


def _measure(model: str, method: str, group: int, weights: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "bench.quantize", "--child", model, method, str(group)] + ([weights] if weights else [])
    load = loadavg()
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    return {**json.loads(out.strip().splitlines()[-1]), "load_before": load, "load_after": loadavg()}


def _sizes(target: Path | None) -> dict | None:
    if target is None:
        return None
    m = json.loads((target / "manifest.json").read_text())
    st = m["stages"]
    graph = st.get("quantize", st["export"])["artifacts"][0]
    return {"target": str(target), "onnx_bytes": graph["bytes"],
            "fused_onnx_bytes": st["surgery"]["artifacts"][0]["bytes"] if "surgery" in st else None,
            "plan_bytes": st["engines"]["artifacts"][0]["bytes"] if "engines" in st else None,
            "quantize": {k: st["quantize"].get(k) for k in ("method", "seconds", "peak_rss_mib")} if "quantize" in st
            else None}


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, method, group, *weights = sys.argv[2:]
        print(json.dumps(_child(model, method, int(group), weights[0] if weights else None)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.quantize")
    p.add_argument("--int4-target", type=Path, help="a built int4-awq target of the default model")
    p.add_argument("--fp16-target", type=Path, help="a built fp16 target of the default model")
    args = p.parse_args(argv)
    rows = []
    for model, group in CASES:
        for method in ("rtn", "awq"):
            weights = None
            if model == "minicpmo26-tts" and method == "awq" and args.int4_target:
                weights = str(args.int4_target / "quantized.safetensors")      # its AWQ took minutes already
            log(f"{model} {method} g{group}" + (f" (weights from {weights})" if weights else ""))
            rows.append(_measure(model, method, group, weights))
    result = {"date": time.strftime("%Y-%m-%d"), "quality": rows,
              "int4": _sizes(args.int4_target), "fp16": _sizes(args.fp16_target)}
    if result["int4"] and result["fp16"] and result["int4"]["plan_bytes"] and result["fp16"]["plan_bytes"]:
        result["plan_ratio"] = round(result["int4"]["plan_bytes"] / result["fp16"]["plan_bytes"], 3)
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"quantize-{result['date']}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| model | method | group | quantize s | peak RSS MiB | rel. error vs fp | load avg before/after |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['group_size']} | {r['quantize_s'] or 'see int4 target'} | "
                     f"{r['peak_rss_mib'] or '-'} | {100 * r['rel_error']:.2f} % | {r['load_before'][0]} / {r['load_after'][0]} |")
    for key in ("fp16", "int4"):
        if result[key]:
            s = result[key]
            lines.append(f"\n{key}: ONNX {s['onnx_bytes']} B, fused {s['fused_onnx_bytes']} B, plan {s['plan_bytes']} B"
                         + (f", quantize {s['quantize']}" if s.get("quantize") else ""))
    if "plan_ratio" in result:
        lines.append(f"\nint4 plan / fp16 plan = {result['plan_ratio']}")
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
