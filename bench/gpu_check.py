"""The prepared device check: one call on a lent GPU machine (an H200 here: SM90, CUDA 13,
PyTorch with CUDA, ONNX Runtime CPU, no network) measures and checks what a CPU host cannot.

    python -m bench.gpu_check run [--parts timing,bandwidth,export,tensorrt] [--model minicpmo26-tts]
    python -m bench.gpu_check split WHEEL --out DIR [--max-mib 60]    # here: a wheel in carryable parts
    python -m bench.gpu_check join DIR --out WHEELS                    # there: the parts back into wheels

``run`` writes bench/results/gpu-<date>.md and .json (``--out`` elsewhere, e.g. $OUT) after every
part, so a call stopped at its time limit still returns what it measured:

- ``timing``: the default model's decode step at lastSum 302 and 2048 and a 303-token prefill,
  fp16, median of ``--steps`` (≥ 100) steps, through transformers' model (sdpa attention, its
  DynamicCache) and through kvplan's own decoder module (the export's contract, concat cache),
  each eager, replayed as a CUDA graph and under torch.compile;
- ``bandwidth``: a device-to-device copy's bandwidth (bytes read + written) and from it the
  memory-traffic bound of each timed step (weights + cache read + rows written);
- ``export``: fp16 and bf16 exports on this host, their inputs and outputs against the I/O
  contract, and ONNX Runtime (CPU) on them against kvplan's decoder module on the GPU within the
  shipped profile's tolerances (bf16: ONNX Runtime's CPU provider has no bf16 kernels; its
  refusal is recorded);
- ``tensorrt``: where a TensorRT backend imports (``--wheels DIR`` installs carried wheels
  first), builds the plans of the concat, delta and in-place profiles, deserializes and runs each
  with kvplan.trt.run_engine_check and validates one with the TensorRT runner; what the backend
  says when it cannot (TensorRT-RTX has no SM90) is recorded word for word.

``--device cpu`` runs the same code on a CPU (CUDA graphs and events are then reported as not
run): the tests feed the report writer such a real measurement of a tiny preset.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PARTS = ("timing", "bandwidth", "export", "tensorrt")
MODES = ("eager", "cuda-graph", "compile")
IMPLS = ("transformers", "kvplan")
VERSIONED = ("torch", "transformers", "onnx", "onnxruntime", "onnxscript", "onnx-ir", "onnx-graphsurgeon",
             "polygraphy", "numpy", "tensorrt", "tensorrt-cu13", "tensorrt-rtx-cu13", "tensorrt_rtx_cu13_libs",
             "cuda-bindings", "nvidia-cuda-runtime")
CHUNK = 1 << 20


class NotRun(Exception):
    """A measurement that cannot run here, with the reason (recorded, not raised further)."""


# --------------------------------------------------------------------------- wheels in parts

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def split_wheel(wheel: Path, out: Path, max_bytes: int) -> list[Path]:
    """``wheel`` as ``out``/NAME.partK files of at most ``max_bytes`` each, and NAME.parts.json
    (sizes and sha256 of the whole and of every part); returns the files written."""
    if max_bytes < 1:
        raise SystemExit("--max-mib must be positive")
    if not wheel.is_file():
        raise SystemExit(f"{wheel}: no such wheel")
    out.mkdir(parents=True, exist_ok=True)
    parts, written = [], []
    with open(wheel, "rb") as f:
        k = 0
        while True:
            data = f.read(max_bytes)
            if not data:
                break
            part = out / f"{wheel.name}.part{k}"
            part.write_bytes(data)
            parts.append({"file": part.name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
            written.append(part)
            k += 1
    manifest = out / f"{wheel.name}.parts.json"
    manifest.write_text(json.dumps({"wheel": wheel.name, "bytes": wheel.stat().st_size,
                                    "sha256": _sha256(wheel), "parts": parts}, indent=1) + "\n")
    return [manifest, *written]


def join_wheels(parts_dir: Path, out: Path) -> list[Path]:
    """Every NAME.parts.json in ``parts_dir`` back into ``out``/NAME, each part and the whole
    checked against their sha256; a missing or damaged part is an error naming it."""
    manifests = sorted(parts_dir.glob("*.parts.json"))
    if not manifests:
        raise SystemExit(f"{parts_dir}: no *.parts.json (split the wheels with `bench.gpu_check split`)")
    out.mkdir(parents=True, exist_ok=True)
    joined = []
    for m in manifests:
        info = json.loads(m.read_text())
        missing = [p["file"] for p in info["parts"] if not (parts_dir / p["file"]).is_file()]
        if missing:
            raise SystemExit(f"{m.name}: parts missing from {parts_dir}: {', '.join(missing)}")
        target = out / info["wheel"]
        tmp = target.with_name(target.name + ".joining")
        h = hashlib.sha256()
        with open(tmp, "wb") as f:
            for p in info["parts"]:
                data = (parts_dir / p["file"]).read_bytes()
                if hashlib.sha256(data).hexdigest() != p["sha256"]:
                    tmp.unlink()
                    raise SystemExit(f"{parts_dir / p['file']}: sha256 differs from {m.name}: damaged part")
                h.update(data)
                f.write(data)
        if h.hexdigest() != info["sha256"]:
            tmp.unlink()
            raise SystemExit(f"{target.name}: joined sha256 differs from {m.name}")
        os.replace(tmp, target)
        joined.append(target)
    return joined


def install_wheels(wheels: Path, target: Path) -> dict:
    """pip install --target (no index, no dependencies) and put it first on sys.path."""
    files = sorted(str(p) for p in wheels.glob("*.whl"))
    if not files:
        return {"installed": [], "why": f"{wheels}: no wheels"}
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--upgrade", "--target", str(target), *files], capture_output=True, text=True)
    if proc.returncode == 0:
        sys.path.insert(0, str(target))
        importlib.invalidate_caches()
        # The check's own subprocesses (build.engines, build.validate) import them too.
        os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, (str(target), os.environ.get("PYTHONPATH"))))
    return {"installed": [Path(f).name for f in files], "rc": proc.returncode, "tail": proc.stderr[-1500:]}


# --------------------------------------------------------------------------- environment

def versions() -> dict:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def machine(device) -> dict:
    import torch
    info = {"python": platform.python_version(), "platform": platform.platform(), "cores": os.cpu_count(),
            "device": str(device), "torch_cuda": torch.version.cuda, "versions": versions()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, compute_capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,clocks.max.mem",
                                  "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
            info["nvidia_smi"] = smi.stdout.strip()
    else:
        info["gpu"] = None
    try:
        info["kvplan_commit"] = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                                               text=True).stdout.strip() or None
    except OSError:
        info["kvplan_commit"] = None
    return info


# --------------------------------------------------------------------------- timing

def time_ms(fn, steps: int, warmup: int, device) -> dict:
    """Median (and p10/p90) milliseconds per call of ``fn``: CUDA events around each call on a
    GPU, the wall clock on a CPU."""
    import torch
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(steps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(steps):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return {"median_ms": round(statistics.median(times), 4), "p10_ms": round(times[len(times) // 10], 4),
            "p90_ms": round(times[(9 * len(times)) // 10], 4), "steps": steps}


def as_cuda_graph(fn, device):
    """``fn`` captured once into a CUDA graph; returns its replay."""
    import torch
    if device.type != "cuda":
        raise NotRun("CUDA graphs need a CUDA device")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):          # allocations and lazy initialisation happen before capture
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    n: int
    last: int


def shapes_from(decode_lastsums: list[int], prefill: int) -> list[Shape]:
    return [Shape(f"decode lastSum {s}", 1, s) for s in decode_lastsums] + [Shape(f"prefill {prefill}", prefill, 0)]


def kvplan_step(source, dtype, device, shape: Shape):
    """kvplan's decoder module (the exported contract: explicit mask, concat cache) at one shape."""
    import torch

    from kvplan.decoder import DecoderStack, StackSpec
    from kvplan.export.exporter import causal_mask
    from kvplan.models.presets import tensor_shapes
    cfg = source.config
    # Built in ``dtype`` and moved without a dtype: the rotary frequencies stay fp32, as exported.
    stack = DecoderStack(cfg, StackSpec(0, cfg.num_layers, True), dtype)
    weights = source.read_tensors(list(tensor_shapes(cfg)))
    stack.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=True)
    stack = stack.to(device).eval()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(1, shape.n, cfg.hidden_size, generator=g).to(device, dtype)
    mask = causal_mask(1, shape.n, shape.last, dtype).to(device)
    pos = torch.arange(shape.last, shape.last + shape.n, device=device)[None]
    past = [torch.randn(1, cfg.num_kv_heads, shape.last, cfg.head_dim, generator=g).to(device, dtype)
            for _ in range(2 * cfg.num_layers)]

    def step(module=stack):
        with torch.no_grad():
            return module(hidden, mask, pos, *past)
    return stack, step


def transformers_step(source, dtype, device, shape: Shape):
    """transformers' model as users run it: sdpa attention and its default DynamicCache, holding
    lastSum rows before every step (cropped back after each: views, no copy), so every timed
    step does the same work, the cache append included."""
    import torch

    from kvplan.validate.reference import HFReference
    ref = HFReference(source, dtype)
    model = ref.model.to(device)
    model.config._attn_implementation = "sdpa"
    cfg = source.config
    g = torch.Generator().manual_seed(0)
    cache = ref.new_cache()
    if shape.last:
        for i in range(cfg.num_layers):
            k, v = (torch.randn(1, cfg.num_kv_heads, shape.last, cfg.head_dim, generator=g).to(device, dtype)
                    for _ in range(2))
            cache.update(k, v, i)
    hidden = torch.randn(1, shape.n, cfg.hidden_size, generator=g).to(device, dtype)
    pos = torch.arange(shape.last, shape.last + shape.n, device=device)[None]

    held: list = []

    def step(module=model):
        # The tensors this call reads stay referenced until the next call: a CUDA graph captured
        # from it replays reads of exactly these (the crop below drops the cache's own references).
        held[:] = _cache_refs(cache)
        with torch.no_grad():
            out = module(inputs_embeds=hidden, position_ids=pos, use_cache=True, **{ref._cache_kw: cache})
        cache.crop(-shape.n)        # back to lastSum rows (transformers 5 crops by a negative count only)
        return out
    return model, step


def _cache_refs(cache) -> list:
    """The tensors a transformers cache holds (5.x: per-layer objects; 4.x: key/value lists)."""
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (getattr(layer, "keys", None), getattr(layer, "values", None))
                if t is not None]
    return list(getattr(cache, "key_cache", [])) + list(getattr(cache, "value_cache", []))


def timing(source, device, dtype, shapes: list[Shape], modes, impls, steps: int, warmup: int, log) -> list[dict]:
    import torch
    rows = []
    for impl in impls:
        for shape in shapes:
            for mode in modes:
                row = {"impl": impl, "shape": shape.name, "N": shape.n, "lastSum": shape.last, "mode": mode}
                try:
                    make = kvplan_step if impl == "kvplan" else transformers_step
                    module, step = make(source, dtype, device, shape)
                    if mode == "cuda-graph":
                        fn = as_cuda_graph(step, device)
                    elif mode == "compile":
                        compiled = torch.compile(module, dynamic=False)
                        fn = functools.partial(step, compiled)
                    else:
                        fn = step
                    t0 = time.perf_counter()
                    fn()                                        # compile/capture outside the timing
                    row["first_call_s"] = round(time.perf_counter() - t0, 2)
                    row.update(time_ms(fn, steps, warmup, device))
                except NotRun as e:
                    row.update(ran=False, why=str(e))
                except Exception as e:  # noqa: BLE001 - one failed mode must not lose the others
                    row.update(ran=False, why=f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
                log(f"[timing] {impl} {shape.name} {mode}: {row.get('median_ms', row.get('why'))}")
                rows.append(row)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- bandwidth

def bandwidth(device, mib: int, reps: int = 10) -> dict:
    """Device-to-device copy bandwidth, counting the bytes read and written."""
    import torch
    n = mib << 20
    src = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = time_ms(lambda: dst.copy_(src), reps, 3, device)
    gbs = 2 * n / (t["median_ms"] / 1e3) / 1e9
    return {"bytes": n, "median_ms": t["median_ms"], "gb_per_s": round(gbs, 1)}


def traffic_bytes(cfg, shape: Shape, itemsize: int, weight_bytes: int) -> int:
    """Bytes a step must move at least: every weight once, the cache read, the new rows written."""
    row = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * itemsize
    return weight_bytes + row * shape.last + row * shape.n


def bounds(cfg, shapes: list[Shape], bw: dict, weight_bytes: int, itemsize: int = 2) -> list[dict]:
    out = []
    for s in shapes:
        b = traffic_bytes(cfg, s, itemsize, weight_bytes)
        out.append({"shape": s.name, "bytes": b, "bound_ms": round(b / (bw["gb_per_s"] * 1e9) * 1e3, 4)})
    return out


# --------------------------------------------------------------------------- export

def export_check(source, device, dtypes: list[str], tmp: Path, log) -> dict:
    """Exports on this host against the I/O contract, and ONNX Runtime (CPU) on them against
    kvplan's decoder module on ``device`` at the decode profile's opt shape."""
    import numpy as np
    import onnx
    import torch

    from kvplan import profiles
    from kvplan.decoder import pack_specs
    from kvplan.export.exporter import TORCH_DTYPES, causal_mask, export_pack, input_names, io_contract
    from kvplan.trt.runtime_check import _ort_run
    out = {}
    cfg = source.config
    [spec] = pack_specs(cfg, 0, 0)
    for dtype in dtypes:
        rec: dict = {}
        out[dtype] = rec
        tol = profiles.load({"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[dtype]).validate
        path = tmp / f"decoder.{dtype}.onnx"
        t0 = time.perf_counter()
        export_pack(source, spec, dtype, 1, path)
        rec["export_s"] = round(time.perf_counter() - t0, 2)
        model = onnx.load(str(path), load_external_data=False)
        contract = io_contract(cfg, spec, 1, dtype)
        rec["contract_diffs"] = _contract_diffs(model, contract)
        rec["contract_ok"] = not rec["contract_diffs"]
        last = 302 if cfg.max_position_embeddings > 303 else 4
        g = torch.Generator().manual_seed(1)
        tdt = TORCH_DTYPES[dtype]
        inputs = {"hidden_in": torch.randn(1, 1, cfg.hidden_size, generator=g).to(tdt),
                  "attention_mask": causal_mask(1, 1, last, tdt),
                  "position_ids": torch.tensor([[last]])}
        for i in spec.layers:
            for kind in ("key", "value"):
                inputs[f"past_{kind}_in{i}"] = torch.randn(1, cfg.num_kv_heads, last, cfg.head_dim, generator=g).to(tdt)
        module, step = kvplan_step(source, tdt, device, Shape("check", 1, last))
        with torch.no_grad():
            dev = {k: v.to(device) for k, v in inputs.items()}
            got = module(*(dev[n] for n in input_names(spec)))
        want_names = [o.name for o in model.graph.output]
        torch_out = {n: t.float().cpu().numpy() for n, t in zip(want_names, got)}
        try:
            ort_out = _ort_run(path, inputs)
        except Exception as e:  # noqa: BLE001 - bf16 on ONNX Runtime's CPU provider
            rec.update(onnxruntime_ran=False, why=f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
            log(f"[export] {dtype}: contract {'ok' if rec['contract_ok'] else 'DIFFERS'}; ONNX Runtime: {rec['why']}")
            continue
        worst, ok = 0.0, True
        for name, a in torch_out.items():
            b = ort_out[name]
            worst = max(worst, float(np.abs(a - b).max()) if a.size else 0.0)
            ok &= bool(np.allclose(b, a, atol=tol.atol, rtol=tol.rtol))
        rec.update(onnxruntime_ran=True, lastSum=last, max_abs=worst, atol=tol.atol, rtol=tol.rtol, ok=ok)
        log(f"[export] {dtype}: contract {'ok' if rec['contract_ok'] else 'DIFFERS'}; ONNX Runtime vs "
            f"PyTorch on {device}: max |d| {worst:.3g} ({'ok' if ok else 'MISMATCH'})")
    return out


def _contract_diffs(model, contract: dict) -> list[str]:
    from onnx import TensorProto
    names = {TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.BFLOAT16: "bfloat16",
             TensorProto.INT64: "int64"}
    diffs = []
    for kind, values in (("inputs", model.graph.input), ("outputs", model.graph.output)):
        have = {}
        for v in values:
            t = v.type.tensor_type
            have[v.name] = {"dtype": names.get(t.elem_type, str(t.elem_type)),
                            "shape": [d.dim_param or d.dim_value for d in t.shape.dim]}
        want = contract[kind]
        if list(have) != list(want):
            diffs.append(f"{kind}: {list(have)} != contract {list(want)}")
        for name, info in want.items():
            if name in have and (have[name]["dtype"] != info["dtype"] or have[name]["shape"] != list(info["shape"])):
                diffs.append(f"{name}: {have[name]} != contract {info}")
    return diffs


# --------------------------------------------------------------------------- TensorRT

def tensorrt_check(model: str, tmp: Path, log) -> dict:
    """Builds the concat, delta and in-place plans with whichever backend imports, runs each with
    run_engine_check (the backend's own refusal recorded where it cannot run here), and one
    validation with the TensorRT runner."""
    from kvplan import profiles
    from kvplan.errors import KvplanError
    from kvplan.manifest import load_manifest
    from kvplan.trt import run_engine_check
    from kvplan.trt.backend import select_backend
    try:
        backend = select_backend("auto")
    except KvplanError as e:
        return {"ran": False, "why": str(e)}
    rec = {"backend": backend.describe(), "gpus": list(backend.gpus), "lacks": list(backend.lacks), "plans": {}}
    for kv_io in ("concat", "delta", "inplace"):
        name = f"fp16-{kv_io}"
        text = (ROOT / "profiles" / "fp16.toml").read_text().replace('kv_io = "concat"', f'kv_io = "{kv_io}"')
        (tmp / f"{name}.toml").write_text(text)
        build = subprocess.run([sys.executable, "-m", "build.engines", "--profile", str(tmp / f"{name}.toml"),
                                "--model", model, "--out", str(tmp / "engines"), "--backend", backend.name],
                               cwd=ROOT, capture_output=True, text=True)
        entry = {"build_rc": build.returncode}
        rec["plans"][kv_io] = entry
        if build.returncode != 0:
            entry["build_tail"] = (build.stdout + build.stderr)[-1500:]
            log(f"[tensorrt] {kv_io}: build failed (rc {build.returncode})")
            continue
        target = tmp / "engines" / model / name
        manifest = load_manifest(target)
        [plan] = manifest["stages"]["engines"]["artifacts"]
        [exported] = manifest["stages"]["export"]["artifacts"]
        fused = manifest["stages"].get("surgery", {}).get("artifacts") or [exported]
        profile = profiles.load(str(tmp / f"{name}.toml"))
        # Try to run even where kvplan knows the backend cannot: the backend's own words are the result.
        forced = dataclasses.replace(backend, can_run=True, why_not_run="")
        try:
            entry["engine_check"] = run_engine_check(target / plan["path"], profile, exported["io"],
                                                     target / fused[0]["path"], forced, log=log)
        except Exception as e:  # noqa: BLE001
            entry["engine_check"] = {"ran": False, "why": f"{type(e).__name__}: {e}"}
        log(f"[tensorrt] {kv_io}: {json.dumps(entry['engine_check'])[:300]}")
        if kv_io == "inplace":
            v = subprocess.run([sys.executable, "-m", "build.validate", "--profile", str(tmp / f"{name}.toml"),
                                "--model", model, "--out", str(tmp / "engines"), "--points", "opt", "--no-task",
                                "--backend", backend.name], cwd=ROOT, capture_output=True, text=True)
            entry["validate"] = {"rc": v.returncode, "tail": v.stdout[-6000:] + v.stderr[-800:]}
    return rec


# --------------------------------------------------------------------------- report

def report_lines(result: dict) -> list[str]:
    m = result["machine"]
    lines = [f"# Device check {result['date']}: {m.get('gpu') or 'no GPU'} ({result['model']})", "",
             f"- device: {m['device']}" + (f", compute capability {m['compute_capability']}, "
                                          f"{m['gpu_memory_gib']} GiB" if m.get("gpu") else ""),
             f"- nvidia-smi: {m.get('nvidia_smi', '—')}",
             f"- torch CUDA: {m.get('torch_cuda')}; python {m['python']}; kvplan {m.get('kvplan_commit')}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in sorted(m["versions"].items())), ""]
    if "bandwidth" in result:
        bw = result["bandwidth"]
        if bw.get("ran") is False:
            lines += [f"Bandwidth: not run: {bw['why']}", ""]
        else:
            lines += [f"Device-to-device copy: {bw['gb_per_s']} GB/s (read + written, {bw['bytes'] >> 20} MiB, "
                      f"median {bw['median_ms']} ms).", ""]
    if "timing" in result:
        bound = {b["shape"]: b["bound_ms"] for b in result.get("bounds", [])}
        lines += [f"## Step latency ({result['dtype']}, median of {result['steps']} steps)", "",
                  "| implementation | step | mode | median ms | p10 | p90 | memory bound ms | first call s |",
                  "|---|---|---|---:|---:|---:|---:|---:|"]
        for r in result["timing"]:
            if "median_ms" in r:
                lines.append(f"| {r['impl']} | {r['shape']} | {r['mode']} | {r['median_ms']} | {r['p10_ms']} | "
                             f"{r['p90_ms']} | {bound.get(r['shape'], '—')} | {r['first_call_s']} |")
            else:
                lines.append(f"| {r['impl']} | {r['shape']} | {r['mode']} | not run: {r['why']} | | | "
                             f"{bound.get(r['shape'], '—')} | |")
        lines.append("")
    if "export" in result:
        lines += ["## Export on this host", ""]
        ex = result["export"]
        if ex.get("ran") is False:
            lines.append(f"not run: {ex['why']}")
        for dtype, r in ex.items():
            if not isinstance(r, dict):
                continue
            contract = "matches the I/O contract" if r.get("contract_ok") else f"differs: {r.get('contract_diffs')}"
            ort = (f"ONNX Runtime (CPU) vs PyTorch on {m['device']}: max |d| {r['max_abs']:.3g} "
                   f"(atol {r['atol']}, rtol {r['rtol']}) {'ok' if r['ok'] else 'MISMATCH'}"
                   if r.get("onnxruntime_ran") else f"ONNX Runtime: not run: {r.get('why')}")
            lines.append(f"- {dtype}: {contract}; {ort}")
        lines.append("")
    if "tensorrt" in result:
        t = result["tensorrt"]
        lines += ["## TensorRT", ""]
        if t.get("ran") is False:
            lines.append(f"not run: {t['why']}")
        else:
            lines.append(f"backend: {t['backend']}")
            for kv_io, e in t.get("plans", {}).items():
                check = e.get("engine_check", {})
                what = ("ran, " + ("ok" if check.get("ok") else f"ok={check.get('ok')}")) if check.get("ran") else \
                    f"not run: {check.get('why', e.get('build_tail', ''))}"
                lines.append(f"- {kv_io}: build rc {e['build_rc']}; engine check {what}")
                if "validate" in e:
                    tail = [ln for ln in e["validate"]["tail"].splitlines() if ln.strip()]
                    lines.append(f"  - validation (TensorRT runner) rc {e['validate']['rc']}: "
                                 + (" / ".join(ln.strip() for ln in tail if "tensorrt" in ln.lower())[:600]
                                    or (tail[-1][:600] if tail else "")))
        lines.append("")
    if result.get("errors"):
        lines += ["## Errors", ""] + [f"- {k}: {v}" for k, v in result["errors"].items()] + [""]
    return lines


def write_report(result: dict, out: Path) -> tuple[Path, Path]:
    """gpu-<date>.json and .md under ``out`` (atomic: never half-written under the final name)."""
    from kvplan.fileio import write_atomic
    out.mkdir(parents=True, exist_ok=True)
    base = out / f"gpu-{result['date']}"
    js, md = base.with_suffix(".json"), base.with_suffix(".md")
    write_atomic(js, (json.dumps(result, indent=1, default=str) + "\n").encode())
    write_atomic(md, ("\n".join(report_lines(result)) + "\n").encode())
    return js, md


# --------------------------------------------------------------------------- main

def _csv(kind, allowed):
    def parse(text: str) -> list:
        items = [x.strip() for x in text.split(",") if x.strip()]
        bad = [x for x in items if allowed is not None and x not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{kind}: {', '.join(bad) or '(empty)'} not among {', '.join(allowed)}")
        return items
    return parse


def _ints(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: not a comma list of integers") from None
    if not values or any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: not a comma list of non-negative integers")
    return values


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="measure and check on this machine's GPU")
    r.add_argument("--parts", type=_csv("--parts", PARTS), default=list(PARTS))
    r.add_argument("--model", default="minicpmo26-tts")
    r.add_argument("--device", default="cuda", help="cuda (default) or cpu (the same code, for tests)")
    r.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    r.add_argument("--modes", type=_csv("--modes", MODES), default=list(MODES))
    r.add_argument("--impls", type=_csv("--impls", IMPLS), default=list(IMPLS))
    r.add_argument("--decode-lastsum", type=_ints, default=[302, 2048])
    r.add_argument("--prefill", type=int, default=303)
    r.add_argument("--steps", type=int, default=100)
    r.add_argument("--warmup", type=int, default=10)
    r.add_argument("--bandwidth-mib", type=int, default=1024)
    r.add_argument("--export-dtypes", type=_csv("--export-dtypes", ("float16", "bfloat16", "float32")),
                   default=["float16", "bfloat16"])
    r.add_argument("--wheels", type=Path, help="install these wheels (pip --target, no index) before importing TensorRT")
    r.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    r.add_argument("--date", default=None, help=argparse.SUPPRESS)
    s = sub.add_parser("split", help="split a wheel into parts that fit one carry")
    s.add_argument("wheel", type=Path)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--max-mib", type=int, default=60)
    j = sub.add_parser("join", help="join split wheels back (sha256 checked)")
    j.add_argument("parts", type=Path)
    j.add_argument("--out", type=Path, required=True)
    return p


def check_run_args(args, p) -> None:
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and args.steps < 100:
        p.error("--steps: the GPU figures are medians of at least 100 steps")
    if args.prefill < 1 or args.bandwidth_mib < 1:
        p.error("--prefill and --bandwidth-mib must be >= 1")
    if args.device not in ("cuda", "cpu") and not args.device.startswith("cuda:"):
        p.error(f"--device: {args.device!r} is not cuda, cuda:K or cpu")


def run(args, log=print) -> dict:
    import torch

    from kvplan.export.exporter import TORCH_DTYPES
    from kvplan.models import resolve
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    result = {"date": args.date or time.strftime("%Y-%m-%d"), "model": args.model, "dtype": args.dtype,
              "steps": args.steps, "parts": args.parts, "errors": {}}
    if args.wheels:
        result["wheels"] = install_wheels(args.wheels, Path(tempfile.gettempdir()) / "kvplan-gpu-check-site")
    result["machine"] = machine(device)
    source = resolve(args.model)
    shapes = shapes_from(args.decode_lastsum, args.prefill)
    dtype = TORCH_DTYPES[args.dtype]
    write_report(result, args.out)
    with tempfile.TemporaryDirectory(prefix="kvplan-gpu-check-") as tmp:
        for part in args.parts:
            t0 = time.perf_counter()
            try:
                if part == "timing":
                    result["timing"] = timing(source, device, dtype, shapes, args.modes, args.impls, args.steps,
                                              args.warmup, log)
                elif part == "bandwidth":
                    result["bandwidth"] = bandwidth(device, args.bandwidth_mib)
                    weights = sum(t.numel() for t in source.read_tensors(
                        [n for n in _weight_names(source)]).values()) * dtype.itemsize
                    result["weight_bytes"] = weights
                    result["bounds"] = bounds(source.config, shapes, result["bandwidth"], weights, dtype.itemsize)
                elif part == "export":
                    result["export"] = export_check(source, device, args.export_dtypes, Path(tmp), log)
                elif part == "tensorrt":
                    result["tensorrt"] = tensorrt_check(args.model, Path(tmp), log)
            except Exception as e:  # noqa: BLE001 - a failed part is recorded; the others still run
                result["errors"][part] = f"{type(e).__name__}: {e}"
                log(traceback.format_exc())
            result.setdefault("seconds", {})[part] = round(time.perf_counter() - t0, 1)
            write_report(result, args.out)
    return result


def _weight_names(source) -> list[str]:
    from kvplan.models.presets import tensor_shapes
    return [n for n in tensor_shapes(source.config) if not n.endswith("inv_freq")]


def main(argv=None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.command == "split":
        for f in split_wheel(args.wheel, args.out, args.max_mib << 20):
            print(f)
        return 0
    if args.command == "join":
        for f in join_wheels(args.parts, args.out):
            print(f)
        return 0
    check_run_args(args, p)
    result = run(args)
    js, md = write_report(result, args.out)
    print(md.read_text())
    print(f"wrote {js} and {md}")
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
