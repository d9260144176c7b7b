"""Start-up cost: what a command that decides something small pays before it decides.

    python -m bench.startup [--reps 5]

In fresh processes on this machine, the median wall time of ``python -c "import numpy"`` (the
yardstick), ``kvplan --help``, ``kvplan presets``, and on a tiny checkpoint (bench.checkpoint's
tiny-llama, written to a temporary directory) a first ``python -m build.engines --profile fp16``
(every stage, TensorRT-RTX engines included, its own empty trace cache) and a rebuild with
nothing changed. Writes bench/results/startup-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.checkpoint import write_checkpoint
from bench.common import loadavg, machine_info, measure, write_results


def median_wall(cmd: list[str], reps: int, env: dict | None = None) -> dict:
    runs = [measure(cmd, env=env) for _ in range(reps)]
    bad = [r for r in runs if r.get("rc") != 0]
    if bad:
        raise SystemExit(f"{' '.join(cmd)} failed: {bad[0].get('tail')}")
    return {"cmd": " ".join(cmd), "median_s": round(statistics.median(r["wall_s"] for r in runs), 3),
            "runs_s": [r["wall_s"] for r in runs], "peak_rss_mib": max(r["peak_rss_mib"] for r in runs)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args(argv)
    py = sys.executable
    rows = {"import numpy": median_wall([py, "-c", "import numpy"], args.reps),
            "kvplan --help": median_wall([py, "-m", "kvplan", "--help"], args.reps),
            "kvplan presets": median_wall([py, "-m", "kvplan", "presets"], args.reps)}
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "tiny-llama"
        write_checkpoint(ckpt, "tiny-llama")
        build = [py, "-m", "build.engines", "--profile", "fp16", "--model", str(ckpt), "--out", str(Path(tmp) / "out")]
        env = {"KVPLAN_CACHE_DIR": str(Path(tmp) / "cache")}
        rows["first build"] = median_wall(build, 1, env)
        rows["no-op rebuild"] = median_wall(build, args.reps, env)
    numpy_s, first = rows["import numpy"]["median_s"], rows["first build"]["median_s"]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine_info(), "load_after": loadavg(), "rows": rows,
              "ratios": {"presets / import numpy": round(rows["kvplan presets"]["median_s"] / numpy_s, 2),
                         "--help / import numpy": round(rows["kvplan --help"]["median_s"] / numpy_s, 2),
                         "no-op / first build": round(rows["no-op rebuild"]["median_s"] / first, 3)}}
    lines = [f"# Start-up cost, {result['date']}", "",
             f"Median wall of {args.reps} fresh processes (the first build: one), 2 CPU cores. "
             "`python -m bench.startup`.", "", "| command | wall s | peak RSS MiB |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['median_s']} | {r['peak_rss_mib']} |" for name, r in rows.items()]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k} | {v} |" for k, v in result["ratios"].items()]
    write_results("startup", result, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
