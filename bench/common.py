"""Shared helpers: machine info, load-average gating, measured subprocesses, ONNX graph stats."""
from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS_VENV = Path(os.environ.get("KVPLAN_BENCH_PEERS_VENV", "/tmp/peers"))          # optimum-onnx
GENAI_VENV = Path(os.environ.get("KVPLAN_BENCH_GENAI_VENV", "/tmp/peers-genai"))  # onnxruntime-genai
# ml_dtypes 0.6.0 alone (bench/setup_peers.sh), put ahead of the GenAI venv's own 0.7.0 on PYTHONPATH for a
# second GenAI row: the same import cost kvplan's pyproject cap gives kvplan (see pyproject.toml).
GENAI_ML_DTYPES = Path(str(GENAI_VENV) + "-ml_dtypes-0.6")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def wait_for_quiet(threshold: float = 0.8, max_wait_s: float = 600.0, poll_s: float = 10.0) -> dict:
    """Poll until the 1-minute load average drops below threshold (or give up after max_wait_s)."""
    t0 = time.monotonic()
    first = loadavg()
    while os.getloadavg()[0] >= threshold and time.monotonic() - t0 < max_wait_s:
        time.sleep(poll_s)
    waited = round(time.monotonic() - t0, 1)
    now = loadavg()
    ok = now[0] < threshold
    log(f"load average {first} -> {now} after waiting {waited} s" + ("" if ok else " (still busy; measuring anyway)"))
    return {"threshold": threshold, "load_before_wait": first, "load_after_wait": now, "waited_s": waited,
            "quiet": ok}


def _pkg_version(name: str, python: str = sys.executable) -> str | None:
    code = ("import importlib.metadata as m,sys\n"
            "try: print(m.version(sys.argv[1]))\nexcept Exception: print('')")
    try:
        out = subprocess.run([python, "-c", code, name], capture_output=True, text=True, timeout=60).stdout.strip()
    except Exception:
        return None
    return out or None


def machine_info() -> dict:
    cpu = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_kib = None
    try:
        m = re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text())
        mem_kib = int(m.group(1)) if m else None
    except OSError:
        pass
    libs = {n: _pkg_version(n) for n in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-ir",
                                         "onnx-graphsurgeon", "transformers", "tensorrt-rtx-cu13",
                                         "tensorrt_rtx_cu13_libs", "polygraphy", "numpy", "ml_dtypes")}
    peer_libs = {}
    for venv, names in ((PEERS_VENV, ("torch", "transformers", "optimum", "optimum-onnx", "onnx", "ml_dtypes")),
                        (GENAI_VENV, ("torch", "transformers", "onnxruntime-genai", "onnx-ir", "onnx", "ml_dtypes"))):
        py = venv / "bin" / "python"
        if py.exists():
            peer_libs[str(venv)] = {n: _pkg_version(n, str(py)) for n in names}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "build", "surgery", "profiles"],
                                    cwd=ROOT, capture_output=True, text=True).stdout.strip())
    except OSError:
        commit, dirty = None, None
    return {"cpu_model": cpu, "cores": os.cpu_count(), "ram_gib": round(mem_kib / 2**20, 1) if mem_kib else None,
            "platform": platform.platform(), "python": platform.python_version(),
            "libraries": libs, "peer_venv_libraries": peer_libs,
            "kvplan_commit": commit, "kvplan_worktree_dirty": dirty,
            "load_average_at_start": loadavg()}


def measure(cmd: list[str], *, cwd: Path | str = ROOT, env: dict | None = None, timeout: float = 1800,
            log_file: Path | None = None, keep_output: bool = False) -> dict:
    """Run cmd in a fresh helper process; return wall seconds, peak RSS (MiB, max over the command and
    its descendants, via getrusage(RUSAGE_CHILDREN) in the helper), exit code, load before/after, tail."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as tf:
        result_path = tf.name
    helper = [sys.executable, "-m", "bench._measure", result_path, "--"] + [str(c) for c in cmd]
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = str(ROOT) + os.pathsep + full_env.get("PYTHONPATH", "")
    if env:
        full_env.update(env)
    before = loadavg()
    log("$ " + " ".join(str(c) for c in cmd))
    try:
        proc = subprocess.run(helper, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)
        out = proc.stdout + proc.stderr
        res = json.loads(Path(result_path).read_text()) if Path(result_path).stat().st_size else {}
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        res = {"rc": "timeout", "wall_s": timeout, "peak_rss_mib": None}
    finally:
        try:
            os.unlink(result_path)
        except OSError:
            pass
    if log_file:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text(" ".join(map(str, cmd)) + "\n\n" + out)
    res.update({"cmd": " ".join(str(c) for c in cmd), "load_before": before, "load_after": loadavg(),
                "tail": _tail(out, 1500 if res.get("rc") != 0 else 300)})
    if keep_output:
        res["_output"] = out
    log(f"  rc={res.get('rc')} wall={res.get('wall_s')} s peak_rss={res.get('peak_rss_mib')} MiB")
    return res


def _tail(out: str, n: int) -> str:
    lines = [ln.rstrip() for ln in out.replace("\r", "\n").splitlines() if ln.strip()]
    return "\n".join(lines)[-n:]


def onnx_stats(path: Path) -> dict:
    """Node count, op histogram (top-level graph plus subgraphs counted separately), file sizes."""
    import onnx
    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    ops = Counter((n.domain + "::" if n.domain not in ("", "ai.onnx") else "") + n.op_type for n in model.graph.node)
    size = path.stat().st_size
    ext = 0
    for p in path.parent.iterdir():
        if p != path and p.is_file() and not p.name.endswith((".onnx", ".json", ".plan", ".lock", ".txt", ".cache")):
            ext += p.stat().st_size
    return {"nodes": sum(ops.values()), "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
            "onnx_bytes": size, "external_data_bytes": ext,
            "inputs": [i.name for i in model.graph.input], "outputs": [o.name for o in model.graph.output],
            "opset": {o.domain or "ai.onnx": o.version for o in model.opset_import}}


def dir_bytes(d: Path) -> int:
    return sum(p.stat().st_size for p in Path(d).rglob("*") if p.is_file())


def mib(b) -> str:
    return "—" if b is None else f"{b / 2**20:.1f}"


def write_results(stem: str, result: dict, lines: list[str]) -> str:
    """bench/results/<stem>-<date>.json (``result``) and .md (``lines``); returns the table, printed."""
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    base = results / f"{stem}-{result['date']}"
    table = "\n".join(lines) + "\n"
    # Not with_suffix: a stem holding dots (llama3.2-1b-shape) would lose what follows the first.
    base.with_name(base.name + ".json").write_text(json.dumps(result, indent=2) + "\n")
    base.with_name(base.name + ".md").write_text(table)
    print(table)
    return table


def fused_target(out: Path, model: str, profile: str) -> tuple[Path, int] | None:
    """Export and fuse ``model`` with ``profile`` under ``out`` (a fresh process, as users run it);
    returns (the target directory, its graph's weight bytes), or None (its output printed) if the
    build failed."""
    res = measure([sys.executable, "-m", "build.engines", "--profile", profile, "--model", model,
                   "--out", str(out), "--stop-after", "surgery"])
    if res.get("rc") != 0:
        print(res.get("tail"), file=sys.stderr)
        return None
    # Where the build put it: a preset by its name, a checkpoint directory or file by its own.
    [target] = {m.parent for m in Path(out).glob("*/*/manifest.json")}
    return target, json.loads((target / "manifest.json").read_text())["stages"]["export"]["weight_bytes"]
