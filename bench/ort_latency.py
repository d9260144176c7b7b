"""ONNX Runtime CPU latency of one decoder graph, with inputs mapped by role.

    python -m bench.ort_latency GRAPH.onnx [--threads 2] [--decode-reps 20] [--prefill-reps 5]
        [--points decode:302,decode:2048,prefill:303] [--hidden 768] [--int4-accuracy-level 0]
        [--session all|validation|basic-default-order]

Roles: input embeddings (kvplan's ``hidden_in``) or token ids (``input_ids``: peers include the
embedding and the LM head), the attention mask (kvplan: additive [B,1,N,sumN]; peers: 2D [B,sumN] of
ones), position ids, and the past key/values (kvplan ``past_key_in{i}``; peers
``past_key_values.{i}.key``). Every input gets the same seeded values for a given role and shape.
Prints one JSON object: session load time and per point the median/min/p90 of the timed runs and
(Linux) the process's peak RSS over the point's runs.

``--session``: ``all`` (ONNX Runtime's highest level, fp16 weights' casts folded into float32
copies), ``validation`` (kvplan's validation sessions: basic level, each cast run beside its
MatMul), ``basic-default-order`` (basic level in ONNX Runtime's default order: every cast first).
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time

import numpy as np

from kvplan.runtime.ort_session import session_options

DT = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64,
      "tensor(int32)": np.int32, "tensor(bfloat16)": None, "tensor(bool)": np.bool_}


def role(name: str) -> str:
    n = name.lower()
    if n in ("hidden_in", "inputs_embeds"):
        return "embeds"
    if n == "input_ids":
        return "ids"
    if n == "write_indices":
        return "write"
    if "mask" in n:
        return "mask"
    if "position" in n:
        return "positions"
    if re.search(r"past|cache|present", n):
        return "past"
    return "other"


def make_feed(sess, n: int, last_sum: int, head_dim: int = 64, vocab: int = 32000, rng_seed: int = 0) -> dict:
    rng = np.random.default_rng(rng_seed)
    total = last_sum + n
    feed = {}
    for inp in sess.get_inputs():
        r = role(inp.name)
        dt = DT.get(inp.type)
        if dt is None:
            raise SystemExit(f"unsupported input type {inp.type} for {inp.name}")
        shape = list(inp.shape)

        def dims(symbolic_values, shape=shape):
            out, k = [], 0
            for i, d in enumerate(shape):
                if isinstance(d, int) and d >= 0:
                    out.append(d)
                elif i == 0:
                    out.append(1)  # batch
                else:
                    out.append(symbolic_values[min(k, len(symbolic_values) - 1)])
                    k += 1
            return out

        if r == "embeds":
            feed[inp.name] = rng.standard_normal(dims([n]), dtype=np.float32).astype(dt)
        elif r == "ids":
            feed[inp.name] = rng.integers(3, min(vocab, 1000), size=dims([n])).astype(dt)
        elif r == "mask":
            if len(shape) == 4:  # additive [B, 1, N, sumN]: keep every slot (the cost does not depend on values)
                s = dims([n, total])
                s[1] = 1
                feed[inp.name] = np.zeros(s, dtype=dt)
            else:  # 2D [B, sumN] of ones
                feed[inp.name] = np.ones(dims([total]), dtype=dt)
        elif r == "write":         # an in-place buffer: this step's rows go at lastSum
            feed[inp.name] = np.full(dims([1]), last_sum, dtype=dt)
        elif r == "positions":
            feed[inp.name] = np.arange(last_sum, total, dtype=np.int64).reshape(1, n).astype(dt)
        elif r == "past":
            s = []
            for i, d in enumerate(shape):
                if isinstance(d, int) and d >= 0:
                    s.append(d)
                elif i == 0:
                    s.append(1)
                elif re.search(r"past|seq|sum|len", str(d), re.I):
                    s.append(last_sum)
                elif re.search(r"dim|head|size", str(d), re.I):
                    s.append(head_dim)
                else:
                    s.append(last_sum)
            feed[inp.name] = (0.5 * rng.standard_normal(s, dtype=np.float32)).astype(dt)
        else:
            raise SystemExit(f"input {inp.name} ({inp.type}, {shape}): no role")
    return feed


def _status_mib(key: str) -> float | None:
    try:
        line = next(x for x in open("/proc/self/status") if x.startswith(key))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) / 1024


def _reset_peak() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def time_runs(sess, feed: dict, warmup: int, reps: int) -> list[float]:
    """Milliseconds of ``reps`` runs after ``warmup`` untimed ones."""
    for _ in range(warmup):
        sess.run(None, feed)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, feed)
        times.append((time.perf_counter() - t) * 1000)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ort_latency")
    p.add_argument("graph")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-reps", type=int, default=20)
    p.add_argument("--prefill-reps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64, help="for caches whose last dim is symbolic")
    p.add_argument("--vocab", type=int, default=32000, help="token ids are drawn below min(vocab, 1000)")
    p.add_argument("--points", default="decode:302,decode:2048,prefill:303")
    p.add_argument("--int4-accuracy-level", type=int, default=None,
                   help="int4 graphs: session.qdq_matmulnbits_accuracy_level (0: full precision, as kvplan's "
                        "validation; default: ONNX Runtime's own, 4, int8 activations)")
    p.add_argument("--session", choices=["all", "validation", "basic-default-order"], default="all")
    a = p.parse_args(argv)
    import onnxruntime as ort
    if a.session == "all":
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
    else:
        so = session_options(a.threads)
        if a.session == "basic-default-order":
            so.execution_order = ort.ExecutionOrder.DEFAULT
    so.intra_op_num_threads = a.threads
    so.inter_op_num_threads = 1
    if a.int4_accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(a.int4_accuracy_level))
    t0 = time.perf_counter()
    sess = ort.InferenceSession(a.graph, so, providers=["CPUExecutionProvider"])
    load_s = time.perf_counter() - t0
    result = {"graph": a.graph, "threads": a.threads, "session": a.session, "load_s": round(load_s, 2),
              "rss_after_load_mib": _status_mib("VmRSS:"),
              "int4_accuracy_level": a.int4_accuracy_level,
              "inputs": {i.name: role(i.name) for i in sess.get_inputs()}, "points": {}}
    for point in a.points.split(","):
        kind, val = point.split(":")
        if kind == "decode":
            n, last_sum, reps = 1, int(val), a.decode_reps
        else:
            n, last_sum, reps = int(val), 0, a.prefill_reps
        feed = make_feed(sess, n, last_sum, a.head_dim, a.vocab)
        _reset_peak()
        try:
            times = time_runs(sess, feed, a.warmup, reps)
        except Exception as e:  # record, keep the other points
            result["points"][point] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            continue
        times.sort()
        result["points"][point] = {"N": n, "lastSum": last_sum, "reps": reps,
                                   "median_ms": round(statistics.median(times), 2), "min_ms": round(times[0], 2),
                                   "p90_ms": round(times[min(len(times) - 1, int(0.9 * len(times)))], 2),
                                   "peak_rss_mib": _status_mib("VmHWM:")}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
