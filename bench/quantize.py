"""int4 weight-only figures: quantize time and peak RSS, quality against full precision, sizes.

    python -m bench.quantize --builds WORK          # everything below, building under WORK
    python -m bench.quantize [--int4-target DIR] [--fp16-target DIR]   # quality rows + two targets' sizes

- Builds (``--builds``): the default model and the Qwen2-0.5B shape, each as fp16, int4 RTN and
  int4 AWQ (group 128), stage by stage in fresh processes (``bench._measure``): quantize wall time
  and peak RSS (the ``--stop-after quantize`` process), ONNX and plan bytes, the builder's
  "Total Weights Memory", the engines stage's peak RSS, and ONNX Runtime CPU decode latency at
  lastSum 302 and 2048 (``bench.ort_latency``, 2 threads; int4 graphs at accuracy level 0, as
  validation runs them, and at ONNX Runtime's default, 4). The int4 targets start from the fp16
  target's export (the same ``[export]`` section); a stage kvplan finds up to date is marked so
  (its process measured nothing), so a rerun reuses what was built. WORK needs about 12 GB.

- Quality: relative error ||hidden_out(int4 weights) - hidden_out(full precision)|| / ||...||
  of the whole stack in fp32 PyTorch, on inputs the calibration never saw (64 tokens, seed 123),
  for RTN and AWQ, on the outlier preset and on the default model.
- Quantize time / peak RSS: each method in its own process (``ru_maxrss`` of that process).
- Sizes: ONNX and plan bytes read from built targets' manifests (``--int4-target``, ``--fp16-target``).
- Real model (``--real WORK``): the rows above are seeded random weights; these are a trained
  model's. SmolLM2-135M-Instruct's perplexity on two texts no calibration saw, through its fp16,
  int4 RTN and shipped int4-awq targets (``bench.perplexity``, without its GGUF rows).
Results go to bench/results/quantize-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench import perplexity
from bench.common import ROOT, loadavg, log, measure
from kvplan.decoder import DecoderStack, StackSpec
from kvplan.export import example_inputs
from kvplan.models import resolve
from kvplan.models.presets import tensor_shapes
from kvplan.profiles import Quantize
from kvplan.quantize.awq import quantize_awq
from kvplan.quantize.stage import quantize_rtn
from kvplan.quantize.weights import Quantized, dequantized_source

RESULTS = ROOT / "bench" / "results"
CASES = [("tiny-llama-outliers", 32), ("minicpmo26-tts", 128)]
BUILD_MODELS = ("minicpmo26-tts", "qwen2-0.5b-shape")
TARGETS = {"fp16": "fp16", "rtn": "int4-rtn", "awq": "int4-awq"}
LATENCY_POINTS = "decode:302,decode:2048"


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


def _profile(work: Path, method: str) -> str:
    if method != "rtn":
        return TARGETS[method]
    # int4-rtn: the shipped int4-awq profile with method = "rtn" (nothing else differs).
    path = work / "int4-rtn.toml"
    text = (ROOT / "profiles" / "int4-awq.toml").read_text()
    path.write_text(re.sub(r'^method = "awq"$', 'method = "rtn"', text, count=1, flags=re.M))
    return str(path)


def _stage(work: Path, model: str, method: str, stop_after: str | None) -> dict:
    cmd = [sys.executable, "-m", "build.engines", "--profile", _profile(work, method), "--model", model,
           "--out", str(work / "targets")] + (["--stop-after", stop_after] if stop_after else [])
    res = measure(cmd, log_file=work / "logs" / f"{model}-{method}-{stop_after or 'engines'}.log", timeout=3000,
                  keep_output=True)
    res["up_to_date"] = f"[{stop_after or 'engines'}] up to date" in res.pop("_output", "")
    if res.get("rc") != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (rc {res.get('rc')}):\n{res.get('tail')}")
    res.pop("tail", None)
    return res


def _latency(graph: Path, level: int | None) -> dict:
    cmd = [sys.executable, "-m", "bench.ort_latency", str(graph), "--threads", "2", "--points", LATENCY_POINTS]
    cmd += ["--int4-accuracy-level", str(level)] if level is not None else []
    load = loadavg()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr[-800:], "load_before": load}
    points = json.loads(done.stdout.strip().splitlines()[-1])["points"]
    return {p: v.get("median_ms", v.get("error")) for p, v in points.items()} | {"load_before": load,
                                                                                 "load_after": loadavg()}


def _build_row(work: Path, model: str, method: str) -> dict:
    target = work / "targets" / model / TARGETS[method]
    fp16 = work / "targets" / model / "fp16"
    if method != "fp16" and not (target / "manifest.json").exists():
        shutil.copytree(fp16, target, ignore=shutil.ignore_patterns(".kvplan*"))   # its export only (see below)
    row = {"model": model, "method": method, "target": str(target), "stages": {}}
    for stage in (["quantize"] if method != "fp16" else []) + ["surgery", None]:
        row["stages"][stage or "engines"] = _stage(work, model, method, stage)
    m = json.loads((target / "manifest.json").read_text())["stages"]
    build = m["engines"]["artifacts"][0]["build"]
    fused = target / m["surgery"]["artifacts"][0]["path"]
    row.update(onnx_bytes=(m.get("quantize") or m["export"])["artifacts"][0]["bytes"],
               fused_onnx_bytes=m["surgery"]["artifacts"][0]["bytes"], plan_bytes=build.get("plan_bytes"),
               builder_weights_bytes=(build.get("memory", {}).get("builder_reported") or {}).get(
                   "total_weights_memory_bytes"),
               quantize=({k: m["quantize"].get(k) for k in ("seconds", "peak_rss_mib")} if "quantize" in m else None))
    row["latency_ms"] = ({"level 0": _latency(fused, 0), "level 4 (default)": _latency(fused, None)}
                         if method != "fp16" else {"fp16": _latency(fused, None)})
    return row


def builds(work: Path) -> list[dict]:
    rows = []
    for model in BUILD_MODELS:
        # One export per model: the int4 targets copy the fp16 target after its export stage (same
        # [export] section, so kvplan finds it up to date there and builds the rest).
        _stage(work, model, "fp16", "export")
        for method in ("rtn", "awq", "fp16"):
            log(f"build {model} {method}")
            rows.append(_build_row(work, model, method))
            (work / "builds.json").write_text(json.dumps(rows, indent=2) + "\n")    # what a failure leaves
    return rows


def _mb(n) -> str:
    return "-" if n is None else f"{n / 1e6:.1f}"


def md_builds(rows: list[dict]) -> list[str]:
    lines = ["", "## Builds: fp16 vs int4 RTN vs int4 AWQ (group 128)", "",
             "Each stage in its own process (`python -m build.engines ... --stop-after quantize|surgery`, then the "
             "engines stage); sizes from the manifests; latency: ONNX Runtime CPU, 2 threads, median ms of 20 decode "
             "steps on the fused graph (int4: accuracy level 0 / ONNX Runtime's default 4). *cached*: kvplan found "
             "the stage up to date, so that process measured nothing.", "",
             "| model | method | quantize s (stage) | quantize process peak RSS MiB | ONNX MB (fused) | plan MB | "
             "builder weights MB | engines stage peak RSS MiB | decode 302 ms | decode 2048 ms | load avg |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|---|"]
    for r in rows:
        st = r["stages"]
        q = st.get("quantize")
        lat = r["latency_ms"]
        fmt = {k: f"{v.get('decode:302')}" for k, v in lat.items()}, {k: f"{v.get('decode:2048')}" for k, v in lat.items()}
        cell = [" / ".join(d.values()) for d in fmt]
        def cached(s):
            return " (cached)" if s and s.get("up_to_date") else ""
        loads = [s.get("load_before", [None])[0] for s in st.values()]
        lines.append(f"| {r['model']} | {r['method']} | {(r['quantize'] or {}).get('seconds', '-')}{cached(q)} | "
                     f"{q.get('peak_rss_mib') if q else '-'}{cached(q)} | {_mb(r['fused_onnx_bytes'])} | "
                     f"{_mb(r['plan_bytes'])} | {_mb(r['builder_weights_bytes'])} | "
                     f"{st['engines'].get('peak_rss_mib')}{cached(st['engines'])} | {cell[0]} | {cell[1]} | "
                     f"{min(loads)}-{max(loads)} |")
    for model in BUILD_MODELS:
        by = {r["method"]: r for r in rows if r["model"] == model}
        if by.get("fp16", {}).get("plan_bytes"):
            ratios = ", ".join(f"{m} {by[m]['plan_bytes'] / by['fp16']['plan_bytes']:.3f}x" for m in ("rtn", "awq")
                               if by.get(m, {}).get("plan_bytes"))
            lines.append(f"\n{model}: int4 plan / fp16 plan: {ratios}")
    return lines


def main(argv=None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--child":
        model, method, group, *weights = sys.argv[2:]
        print(json.dumps(_child(model, method, int(group), weights[0] if weights else None)))
        return 0
    p = argparse.ArgumentParser(prog="python -m bench.quantize")
    p.add_argument("--int4-target", type=Path, help="a built int4-awq target of the default model")
    p.add_argument("--fp16-target", type=Path, help="a built fp16 target of the default model")
    p.add_argument("--builds", type=Path, metavar="WORK",
                   help="build and measure fp16/rtn/awq targets of the default model and the Qwen2-0.5B shape "
                        "under WORK (their targets then give the int4 quality rows' weights)")
    p.add_argument("--real", type=Path, metavar="WORK",
                   help="also the real model's perplexity through fp16, RTN and AWQ targets built under WORK")
    args = p.parse_args(argv)
    built = builds(args.builds) if args.builds else []
    if args.builds:
        args.int4_target = args.int4_target or args.builds / "targets" / "minicpmo26-tts" / "int4-awq"
        args.fp16_target = args.fp16_target or args.builds / "targets" / "minicpmo26-tts" / "fp16"
    rows = []
    cases = CASES + ([("qwen2-0.5b-shape", 128)] if args.builds else [])
    for model, group in cases:
        for method in ("rtn", "awq"):
            weights = None
            if model == "minicpmo26-tts" and method == "awq" and args.int4_target:
                weights = str(args.int4_target / "quantized.safetensors")      # its AWQ took minutes already
            if model == "qwen2-0.5b-shape":
                weights = str(args.builds / "targets" / model / TARGETS[method] / "quantized.safetensors")
            log(f"{model} {method} g{group}" + (f" (weights from {weights})" if weights else ""))
            rows.append(_measure(model, method, group, weights))
    result = {"date": time.strftime("%Y-%m-%d"), "quality": rows, "builds": built,
              "int4": _sizes(args.int4_target), "fp16": _sizes(args.fp16_target)}
    if args.real:
        args.real.mkdir(parents=True, exist_ok=True)
        result["real_model"] = perplexity.measure(args.real, list(perplexity.DEFAULT_TEXTS), 2048,
                                                  calibrations=False, gguf=False)
    if result["int4"] and result["fp16"] and result["int4"]["plan_bytes"] and result["fp16"]["plan_bytes"]:
        result["plan_ratio"] = round(result["int4"]["plan_bytes"] / result["fp16"]["plan_bytes"], 3)
    RESULTS.mkdir(exist_ok=True)
    base = RESULTS / f"quantize-{result['date']}"
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = ["| model | method | group | quantize s | peak RSS MiB | rel. error vs fp | load avg before/after |",
             "|---|---|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['method']} | {r['group_size']} | {r['quantize_s'] or 'see int4 target'} | "
                     f"{r['peak_rss_mib'] or '-'} | {100 * r['rel_error']:.2f} % | "
                     f"{r['load_before'][0]} / {r['load_after'][0]} |")
    for key in ("fp16", "int4"):
        if result[key]:
            s = result[key]
            lines.append(f"\n{key}: ONNX {s['onnx_bytes']} B, fused {s['fused_onnx_bytes']} B, plan {s['plan_bytes']} B"
                         + (f", quantize {s['quantize']}" if s.get("quantize") else ""))
    if "plan_ratio" in result:
        lines.append(f"\nint4 plan / fp16 plan = {result['plan_ratio']}")
    if built:
        lines += md_builds(built)
    if "real_model" in result:
        lines += ["", "Real model:", ""] + perplexity.markdown(result["real_model"])
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
