"""Engine-build memory per optimization profile: peak RSS of building one fused graph with the
first 1, 2, ... optimization profiles of a build profile.

    python -m bench.engine_memory [--model minicpmo26-tts] [--profile fp16]

Exports and fuses the model once (``--stop-after surgery`` into a temporary target), then builds
the plan in a fresh process per profile count (``bench.engine_memory --build K``) so each peak
RSS (getrusage in a helper process) is that build's alone. Writes
bench/results/engine_memory-<date>.json and .md and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench.common import fused_target, loadavg, machine_info, measure, write_results


def _status_mib() -> dict[str, float]:
    """This process's resident memory split as the kernel counts it: anonymous (heap: the builder's
    own copies) and file-backed (libraries, the memory-mapped weights)."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile"):
                found[key] = int(value.split()[0]) / 1024
    return found


class Sampler:
    """/proc/self/status every ``interval`` s on a thread while the block runs; keeps the sample of
    the highest VmRSS and the highest of each part."""

    def __init__(self, interval: float = 0.02):
        self.interval, self.samples, self._stop = interval, [], threading.Event()

    def __enter__(self):
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()
        return self

    def _loop(self):
        while not self._stop.wait(self.interval):
            self.samples.append(_status_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict:
        if not self.samples:
            return {}
        top = max(self.samples, key=lambda s: s.get("VmRSS", 0))
        return {"at_peak_anon_mib": round(top.get("RssAnon", 0), 1), "at_peak_file_mib": round(top.get("RssFile", 0), 1),
                "max_anon_mib": round(max(s.get("RssAnon", 0) for s in self.samples), 1),
                "max_file_mib": round(max(s.get("RssFile", 0) for s in self.samples), 1)}


def build_with(target: Path, model: str, profile_name: str, count: int) -> None:
    """Build ``target``/decoder.fused.onnx with the profile's first ``count`` optimization profiles.

    Imports only what the build needs (no torch: the I/O contract comes from the manifest), so
    the peak is the parser's and the builder's plus a small interpreter.
    """
    from kvplan import profiles
    from kvplan.pipeline import rss_mib
    from kvplan.trt import build_engine
    from kvplan.trt.backend import select_backend
    assert "torch" not in sys.modules
    profile = profiles.load(profile_name)
    profile = dataclasses.replace(profile, engine=dataclasses.replace(profile.engine, shapes=profile.shapes[:count]))
    manifest = json.loads((target / "manifest.json").read_text())
    [entry] = manifest["stages"]["export"]["artifacts"]
    backend = select_backend("auto")
    _ = backend.module          # the bindings imported (their libraries loaded) before the baseline
    before, parts = rss_mib(), _status_mib()
    with Sampler() as sampled:
        record = build_engine(target / "decoder.fused.onnx", target / f"decoder.{count}.plan", profile, entry["io"],
                              backend, None, log=lambda *_: None)
    print(json.dumps({"plan_bytes": record["plan_bytes"], "build_seconds": record["build_seconds"],
                      "rss_before_mib": round(before, 1) if before else None,
                      "anon_before_mib": round(parts.get("RssAnon", 0), 1), **sampled.summary(),
                      "weights_mapped_bytes": record.get("weights_mapped_bytes"),
                      "torch_imported": "torch" in sys.modules}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="minicpmo26-tts")
    p.add_argument("--profile", default="fp16")
    p.add_argument("--build", type=int, help=argparse.SUPPRESS)      # the child process
    p.add_argument("--target", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.build:
        build_with(Path(args.target), args.model, args.profile, args.build)
        return 0
    from kvplan import profiles
    names = [s.name for s in profiles.load(args.profile).shapes]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        built = fused_target(Path(tmp), args.model, args.profile)
        if built is None:
            return 1
        target, weights = built
        for count in range(1, len(names) + 1):
            run = measure([sys.executable, "-m", "bench.engine_memory", "--model", args.model, "--profile",
                           args.profile, "--build", str(count), "--target", str(target)], keep_output=True)
            out = [ln for ln in run.pop("_output", "").splitlines() if ln.startswith("{")]
            rows.append({"profiles": names[:count], "rc": run.get("rc"), "wall_s": run.get("wall_s"),
                         "peak_rss_mib": run.get("peak_rss_mib"), **(json.loads(out[-1]) if out else {})})
    result = {"date": time.strftime("%Y-%m-%d"), "model": args.model, "profile": args.profile,
              "weight_bytes": weights, "machine": machine_info(), "load_after": loadavg(), "rows": rows}
    lines = [f"# Engine build memory: {args.model}, profile {args.profile} "
             f"({weights / 2**20:.1f} MiB of weights)", "",
             "One fresh process per build (parse + build + streamed plan write), which imports the TensorRT "
             "backend and kvplan.trt but not torch (the I/O contract comes from the manifest); peak RSS via "
             "getrusage. *RSS before* is the process after its imports, just before parsing; the parser reads the "
             "weights in place from a memory map of the ONNX file. *At the peak*: the highest sample of "
             "/proc/self/status (every 20 ms) split into anonymous memory (the heap: the builder's own copies) and "
             "file-backed pages (libraries and the mapped weights); *builder heap* is the anonymous memory at the "
             "peak less the anonymous memory before parsing.", "",
             "| optimization profiles | rc | wall s | build s | RSS before MiB | peak RSS MiB | peak / weights | "
             "at the peak: anon / file MiB | builder heap / weights | plan MiB |",
             "|---|---|---:|---:|---:|---:|---:|---|---:|---:|"]
    for r in rows:
        ratio = f"{r['peak_rss_mib'] * 2**20 / weights:.2f}×" if r.get("peak_rss_mib") else "—"
        heap = (f"{(r['at_peak_anon_mib'] - r['anon_before_mib']) * 2**20 / weights:.2f}×"
                if "at_peak_anon_mib" in r and "anon_before_mib" in r else "—")
        lines.append(f"| {', '.join(r['profiles'])} | {r['rc']} | {r['wall_s']} | {r.get('build_seconds', '—')} "
                     f"| {r.get('rss_before_mib', '—')} | {r['peak_rss_mib']} | {ratio} "
                     f"| {r.get('at_peak_anon_mib', '—')} / {r.get('at_peak_file_mib', '—')} | {heap} "
                     f"| {r.get('plan_bytes', 0) / 2**20:.1f} |")
    write_results("engine_memory", result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
