"""KV I/O modes, concat vs delta vs inplace: KV bytes a decode step writes, and its ONNX Runtime CPU latency.

    python -m bench.kv_io [--model minicpmo26-tts] [--dtype float16] [--reps 20] [--cache-len 4096]

Exports the model once per mode (with the fp16 profile's surgery passes), computes the bytes of
KV one decode step (N = 1) writes from the graph's output shapes (inplace: the rows its
TensorScatter updates write into the aliased buffer), and times that step with ONNX Runtime (2
intra-op threads, median of --reps runs after 2 warm-ups) at lastSum 302 and 2048. ONNX Runtime
runs TensorScatter by copying the buffer, so its inplace latency is not the in-place cost a
TensorRT engine has. Writes bench/results/kv_io-<date>.json and .md and prints the table.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import onnx

from bench.common import loadavg, machine_info, write_results

POINTS = (302, 2048)


def export(model: str, dtype: str, kv_io: str, cache_len: int, out: Path) -> Path:
    from kvplan import profiles, surgery
    from kvplan.decoder import pack_specs
    from kvplan.export.exporter import export_pack
    from kvplan.models import resolve
    source = resolve(model)
    [spec] = pack_specs(source.config, 0, 0, kv_io, cache_len)
    export_pack(source, spec, dtype, 1, out / "decoder.onnx")
    surgery.fuse_file(out / "decoder.onnx", out / "decoder.fused.onnx", list(profiles.load("fp16").surgery.passes), log=None)
    return out / "decoder.fused.onnx"


def kv_bytes_per_step(path: Path, last: int) -> int:
    """Bytes of KV one decode step (N = 1) at ``last`` writes, from the output shapes.

    An in-place graph (one with ``write_indices``) outputs its input buffers, updated where
    its TensorScatter nodes write: N rows of each, along the sequence axis (2)."""
    model = onnx.load(str(path), load_external_data=False)
    inplace = any(i.name == "write_indices" for i in model.graph.input)
    sizes = {"N": 1, "sumN": last + 1}
    total = 0
    for value in model.graph.output[1:]:
        elems = 1
        for axis, d in enumerate(value.type.tensor_type.shape.dim):
            elems *= 1 if inplace and axis == 2 else sizes[d.dim_param] if d.dim_param else d.dim_value
        total += elems * onnx.helper.tensor_dtype_to_np_dtype(value.type.tensor_type.elem_type).itemsize
    return total


def step_latency(path: Path, last: int, reps: int) -> dict:
    import onnxruntime as ort

    from bench.ort_latency import make_feed, time_runs
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    opts.log_severity_level = 3        # TensorScatter's per-run copy warning
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    times = time_runs(sess, make_feed(sess, 1, last), warmup=2, reps=reps)
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minicpmo26-tts")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--cache-len", type=int, default=4096, help="rows of the inplace buffer (the fp16 profile's)")
    args = p.parse_args(argv)
    load_before = loadavg()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kv_io in ("concat", "delta", "inplace"):
            graph = export(args.model, args.dtype, kv_io, args.cache_len, Path(tmp) / kv_io)
            for last in POINTS:
                rows.append({"kv_io": kv_io, "lastSum": last, "kv_bytes_written": kv_bytes_per_step(graph, last),
                             **step_latency(graph, last, args.reps)})
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "dtype": args.dtype, "reps": args.reps,
              "cache_len": args.cache_len,
              "machine": machine_info(), "load_before": load_before, "load_after": loadavg(), "rows": rows}
    lines = [f"# KV I/O modes: {args.model} {args.dtype}, one decode step (N = 1)", "",
             f"ONNX Runtime CPU, 2 intra-op threads, median of {args.reps} runs; graphs fused with the fp16 "
             f"profile's passes; inplace buffer {args.cache_len} rows (ONNX Runtime copies it every step and "
             f"attends over all of it; a TensorRT engine updates it in place); "
             f"load average {load_before} before, {result['load_after']} after.", "",
             "| kv_io | lastSum | KV bytes written | ORT median ms | ORT min ms |", "|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['kv_io']} | {r['lastSum']} | {r['kv_bytes_written']:,} | {r['median_ms']} | {r['min_ms']} |")
    write_results("kv_io", result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
