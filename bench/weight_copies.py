"""One weight copy per plan: what each builder route does to the default model's plan.

    python -m bench.weight_copies [--model minicpmo26-tts] [--profile fp16]

Why plans held the weights twice (TensorRT-RTX 1.7): beside another optimization profile, a profile
whose N is fixed at 1 (and batch 1: the linears' M = B x N is exactly 1) gets every linear's weights
stored again, laid out for its M = 1 kernels; any other range (N [1, 1, 2], [2, 2, 2], [1, 1, 8], or a
dynamic batch axis, where M ranges over B) shares one copy. The shipped profiles' decode N is
[1, 1, 2] for that reason. Exports and fuses the model once
(``--stop-after surgery`` into a temporary target), then builds the fused graph in a fresh
process per route (``--route R``; no torch there) and records the plan bytes, the builder's
"Total Weights Memory" line and the build's peak RSS (getrusage of the child):

- ``two-profiles``: the profile as shipped (prefill + decode N [1, 1, 2]), the baseline;
- ``decode-N=a:b:c``: the decode profile's N range set to [a, b, c] (``decode-N=1:1:1``: the
  profiles before, whose decode N was fixed at 1; lastSum max then one more);
- ``extra-memory-0`` / ``extra-memory-0.5``: IOptimizationProfile.extra_memory_target on the
  profiles after the first;
- ``weight-streaming``: BuilderFlag.WEIGHT_STREAMING;
- ``strip-refit``: BuilderFlag.STRIP_PLAN + REFIT_IDENTICAL (weights left out of the plan);
- ``one-profile-decode-opt``: one profile spanning both ranges, with the decode profile's opt
  shapes (N 1, lastSum 302);
- ``residual-3d``: the graph fused by the profile's passes less ``residual2d`` (the shipped form
  before that pass: int4 linears and residual adds on [batch, tokens, features]);
  ``no-attention-pass``: less ``attention`` (the attention left as MatMul / Softmax / MatMul);
  ``no-gqa-pass``: less ``gqa`` (a grouped-query Attention as the attention pass writes it);
- ``graph-*``: the fused graph rewritten first (bench/_graph_forms.py): ``graph-fp16-o-down``
  (int4 graphs: o_proj and down_proj, the linears whose outputs the residual adds take, dequantized
  to float16 initializers), ``graph-swap-add``, ``graph-norm-weight-1``, ``graph-norm-decomposed``,
  ``graph-add-fp32``, ``graph-kv-len-mask`` (each attention's K and V reshaped to the mask's own
  length, one shape symbol for every layer), ``graph-attention-decomposed`` (each attention
  written out with its softmax as max, exp, sum and divide, which the builder does not fuse into
  its attention kernel): graph forms that might change which kernels' source
  is stored per call;
- ``opt-level-L``, ``cc-X.Y``, ``max-tactics-1``, ``verbosity-none``, ``aux-streams-0``: builder
  options that might shrink the kernel source a plan carries (optimization level L, one compute
  capability, one tactic, no layer information, no auxiliary streams).

Each plan's kernel source (the CUDA C++ text TensorRT-RTX compiles on the GPU at load time) is
measured too, so *plan − source* shows how often the weights are stored, and broken down by kernel
for the first route: TensorRT-RTX stores most kernels' source once per profile, but some once per
call (the attention kernel in every plan, in texts identical byte for byte; with int4 linears on
rank-3 tensors, the norm kernel the residual add fuses into, whose texts differ only in a comment
naming the norm's weight).

Writes bench/results/weight_copies-<date>.json and .md.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import mmap
import re
import sys
import tempfile
import time
from pathlib import Path

from bench._graph_forms import REWRITES, rewritten
from bench.common import fused_target, loadavg, machine_info, measure, write_results
from kvplan import profiles
from kvplan.surgery import fuse_file

ROUTES = ("two-profiles", "decode-N=1:1:1", "decode-N=2:2:2", "decode-N=1:1:8", "extra-memory-0",
          "weight-streaming", "one-profile-decode-opt")


# A TensorRT-RTX plan carries the CUDA C++ source of the kernels it compiles on the GPU at load time
# (plain text, no knob leaves it out); weights and the rest are binary. Runs of this many printable
# bytes are that source: random weight bytes make such a run about once in 10^27 tries.
SOURCE_RUN = 64


# A source unit names its kernels `__global__ void NAME_0x<hash>...(`; the program that launches
# them has one `function={ name=NAME fqn=... binary = B` record per call, B the unit it runs.
_UNIT_KERNEL = re.compile(rb"__global__\s+void\s+(\w+?)_0x[0-9a-f]+")
_CALL = re.compile(rb"function=\{ name=(\w+) fqn=")


# A `//` comment to the end of its line: what two units of one kernel may differ in alone.
_COMMENT = re.compile(rb"//[^\n]*")


def kernel_source(plan: Path) -> tuple[int, list[dict]]:
    """The plan's kernel source, read once: its bytes (runs of at least SOURCE_RUN printable ASCII
    characters: tab, newline, space..tilde), and by kernel family (the name before its hash): how
    many calls the plan's programs make to it, how many source units it is stored in, their bytes,
    and how many distinct texts those units are, byte for byte and less their comments. More units
    than profiles means the same kernel's source is stored once per call."""
    total, units = 0, collections.defaultdict(list)
    with open(plan, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        calls = collections.Counter(m.group(1).decode() for m in _CALL.finditer(data))
        for run in re.finditer(rb"[\t\n\r\x20-\x7e]{%d,}" % SOURCE_RUN, data):
            total += run.end() - run.start()
            kernel = _UNIT_KERNEL.search(run.group())
            if kernel:
                text = run.group()
                units[kernel.group(1).decode()].append((len(text), hash(text), hash(_COMMENT.sub(b"", text))))
    rows = [{"kernel": name, "calls": calls.get(name, 0), "units": len(found), "bytes": sum(n for n, _, _ in found),
             "distinct_texts": len({h for _, h, _ in found}),
             "distinct_without_comments": len({h for _, _, h in found})}
            for name, found in units.items()]
    return total, sorted(rows, key=lambda r: -r["bytes"])


def _decode_range(route: str, profile):
    """The profile with its decode profile's N set as ``decode-N=a:b:c`` says, lastSum max fitted to
    the positions N max + lastSum max had."""
    from kvplan.profiles import Range
    lo, opt, hi = (int(x) for x in route.removeprefix("decode-N=").split(":"))
    shapes = []
    for sp in profile.shapes:
        if sp.name == "decode":
            total = sp.N.max + sp.lastSum.max
            sp = dataclasses.replace(sp, N=Range(lo, opt, hi), lastSum=dataclasses.replace(sp.lastSum, max=total - hi))
        shapes.append(sp)
    return profile.with_engine(shapes=tuple(shapes))


def _profile_for(route: str, profile):
    if route.startswith("decode-N="):
        return _decode_range(route, profile)
    if route.startswith("opt-level-"):
        return profile.with_engine(optimization_level=int(route.removeprefix("opt-level-")))
    if route.startswith("cc-"):
        return profile.with_engine(compute_capabilities=(route.removeprefix("cc-"),))
    if route != "one-profile-decode-opt":
        return profile
    prefill, decode = profile.shapes
    wide = dataclasses.replace(decode, name="one", N=dataclasses.replace(prefill.N, opt=decode.N.opt),
                               lastSum=dataclasses.replace(decode.lastSum, min=prefill.lastSum.min))
    return profile.with_engine(shapes=(wide,))


# Routes that fuse the target's graph again with one of the profile's passes left out.
PASS_LEFT_OUT = {"residual-3d": "residual2d", "no-attention-pass": "attention", "no-gqa-pass": "gqa"}


def graph_for(target: Path, profile_name: str, route: str) -> None:
    """Write the graph a route builds, where it is not the target's fused graph, as ``route``.onnx
    beside it: in the parent, so that a child's peak RSS is its build's alone. A PASS_LEFT_OUT
    route fuses the target's graph again with the profile's passes less that pass; a ``graph-*``
    route rewrites the fused graph."""
    out = target / f"{route}.onnx"
    if route in PASS_LEFT_OUT:
        source = target / "decoder.int4.onnx"
        if not source.is_file():
            source = target / "decoder.onnx"
        passes = [p for p in profiles.load(profile_name).surgery.passes if p != PASS_LEFT_OUT[route]]
        fuse_file(source, out, passes, log=None)
    elif route in REWRITES:
        rewritten(target / "decoder.fused.onnx", route, out)


def build_route(target: Path, profile_name: str, route: str) -> None:
    """The child: build ``target``/decoder.fused.onnx (or the route's own graph) one way and print
    one JSON line."""
    from kvplan.trt import build as trt_build
    from kvplan.trt.backend import select_backend
    profile = _profile_for(route, profiles.load(profile_name))
    manifest = json.loads((target / "manifest.json").read_text())
    [entry] = manifest["stages"]["export"]["artifacts"]
    backend = select_backend("auto")
    flags = {"weight-streaming": ("WEIGHT_STREAMING",), "strip-refit": ("STRIP_PLAN", "REFIT_IDENTICAL")}.get(route, ())
    # Builder settings the profile has no field for, set after the profile's own.
    settings = {"max-tactics-1": ("max_num_tactics", lambda trt: 1),
                "verbosity-none": ("profiling_verbosity", lambda trt: trt.ProfilingVerbosity.NONE),
                "aux-streams-0": ("max_aux_streams", lambda trt: 0)}.get(route)
    if flags or settings:
        configure = trt_build.configure

        def with_flags(trt, backend_, config, engine, source, log):
            opts, notes = configure(trt, backend_, config, engine, source, log)
            for flag in flags:
                config.set_flag(getattr(trt.BuilderFlag, flag))
            if settings:
                setattr(config, settings[0], settings[1](trt))
                opts[settings[0]] = str(getattr(config, settings[0]))
            return {**opts, "flags": list(flags)}, notes
        trt_build.configure = with_flags
    emt = float(route.removeprefix("extra-memory-")) if route.startswith("extra-memory-") else None
    out = {"route": route}
    # A route's own graph, where it has one, was written by the parent (graph_for).
    graph = target / f"{route}.onnx"
    if not graph.is_file():
        graph = target / "decoder.fused.onnx"
    try:
        record = trt_build.build_engine(graph, target / f"{route}.plan", profile, entry["io"],
                                        backend, None, log=lambda *_: None, extra_memory_target=emt)
    except Exception as e:  # noqa: BLE001 - a route the builder refuses is a result too
        out["error"] = " ".join(str(e).split())[:600]
    else:
        reported = record["memory"]["builder_reported"] or {}
        out.update(plan_bytes=record["plan_bytes"], builder_weights_bytes=reported.get("total_weights_memory_bytes"),
                   profiles=record["profiles"], build_seconds=record["build_seconds"], plan=f"{route}.plan")
    print(json.dumps(out))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minicpmo26-tts", help="a preset, or a checkpoint directory or file")
    p.add_argument("--profile", default="fp16")
    p.add_argument("--routes", default=",".join(ROUTES))
    p.add_argument("--route", help=argparse.SUPPRESS)        # the child process
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.route:
        build_route(Path(args.target), args.profile, args.route)
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = fused_target(Path(tmp), args.model, args.profile)
        if built is None:
            return 1
        target, _ = built
        # What the plan is measured against: the fused graph's bytes (an int4 graph's int4 weights).
        weights = sum(f.stat().st_size for f in target.glob("decoder.fused.onnx*"))
        for route in args.routes.split(","):
            graph_for(target, args.profile, route)
            run = measure([sys.executable, "-m", "bench.weight_copies", "--profile", args.profile, "--route", route,
                           "--target", str(target)], keep_output=True)
            out = [ln for ln in run.pop("_output", "").splitlines() if ln.startswith("{")]
            rows.append({"rc": run.get("rc"), "peak_rss_mib": run.get("peak_rss_mib"),
                         **(json.loads(out[-1]) if out else {"route": route, "error": "no result line"})})
            plan = target / rows[-1].pop("plan", f"{route}.plan")
            if plan.is_file():
                # Scanned here, not in the child: its peak RSS is the build's alone.
                rows[-1]["kernel_source_bytes"], rows[-1]["kernel_source_by_kernel"] = kernel_source(plan)
                plan.unlink()
            for graph in target.glob(f"{route}.onnx*"):
                graph.unlink()
            print(json.dumps(rows[-1])[:300], flush=True)
    model = Path(args.model).name            # a preset, or a checkpoint directory or file by its name
    result = {"date": time.strftime("%Y-%m-%d"), "model": model, "profile": args.profile,
              "weight_bytes": weights, "machine": machine_info(), "load_after": loadavg(), "rows": rows}
    default = (model, args.profile) == ("minicpmo26-tts", "fp16")
    write_results("weight_copies" if default else f"weight_copies-{model}-{args.profile}", result, table(result))
    return 0


def table(result: dict) -> list[str]:
    weights = result["weight_bytes"]
    lines = [f"# One weight copy per plan: {result['model']}, profile {result['profile']} "
             f"({weights / 2**20:.1f} MiB of fused graph)", "",
             "One fresh process per route (parse + build + streamed plan write, no torch); peak RSS via getrusage; "
             "*builder weights* is the builder's `Total Weights Memory` log line; *kernel source* is the CUDA C++ "
             "text the plan carries for TensorRT-RTX to compile on the GPU (runs of at least "
             f"{SOURCE_RUN} printable bytes), so *plan − source* is the weights and the engine's own tables.", "",
             "| route | plan MiB | plan / weights | kernel source MiB | plan − source / weights | builder weights MiB "
             "| peak RSS MiB | optimization profiles (opt shapes) | result |",
             "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    mib = lambda b: f"{b / 2**20:.1f}" if b is not None else "—"  # noqa: E731
    for r in result["rows"]:
        if "plan_bytes" not in r:
            lines.append(f"| {r['route']} | — | — | — | — | — | {r.get('peak_rss_mib')} | — | {r.get('error', '')} |")
            continue
        opts = ", ".join(f"{name} N {shapes['hidden_in']['opt'][1]} lastSum {shapes['past_key_in0']['opt'][2]}"
                         for name, shapes in r["profiles"].items())
        source = r.get("kernel_source_bytes")
        rest = f"{(r['plan_bytes'] - source) / weights:.2f}×" if source is not None else "—"
        lines.append(f"| {r['route']} | {mib(r['plan_bytes'])} | {r['plan_bytes'] / weights:.2f}× | {mib(source)} | "
                     f"{rest} | {mib(r.get('builder_weights_bytes'))} | {r['peak_rss_mib']} | {opts} | built |")
    shown = [r for r in result["rows"] if r.get("kernel_source_by_kernel")]
    detailed = ("graph-fp16-o-down", "residual-3d", "graph-attention-decomposed")
    for r in [r for r in shown if r is shown[0] or r["route"] in detailed]:
        lines += ["", f"Kernel source of the `{r['route']}` plan by kernel: *calls* are the launches its programs "
                  "make (both profiles), *units* the copies of the source stored, *distinct texts* how many of "
                  "those differ byte for byte, and *less comments* how many still differ once their `//` comments "
                  "are left out. A kernel with as many units as calls has its source stored once per call.", "",
                  "| kernel | calls | source units | distinct texts | less comments | MiB |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| `{k['kernel']}` | {k['calls']} | {k['units']} | {k.get('distinct_texts', '—')} | "
                  f"{k.get('distinct_without_comments', '—')} | {k['bytes'] / 2**20:.2f} |"
                  for k in r["kernel_source_by_kernel"]]
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
