"""The human-readable report, the Polygraphy re-check commands, and the manifest record."""
from __future__ import annotations

import shlex

from kvplan.validate.compare import OutputStats


def _fmt(x: float) -> str:
    return f"{x:.3g}" if x == x else "nan"


def _row(cols: list[str], widths: list[int]) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()


HEADER = ["point", "pack", "runner pair", "output", "max abs", "mean abs", "max rel", "worst index (ref, got)",
          "atol", "rtol", "verdict"]


def _cols(s: OutputStats, output: str) -> list[str]:
    where = f"{list(s.worst_index)} ({_fmt(s.worst_values[0])}, {_fmt(s.worst_values[1])})" if s.worst_values else "-"
    if s.note:
        where = f"{where} {s.note}"
    return [s.point, str(s.pack), s.pair, output, _fmt(s.max_abs), _fmt(s.mean_abs), _fmt(s.max_rel), where,
            f"{s.atol:g}", f"{s.rtol:g}", "PASS" if s.passed else "FAIL"]


def _severity(s: OutputStats) -> float:
    """How close the worst element is to its bound (> 1 fails), to pick the row's worst tensor."""
    if not s.passed:
        return float("inf")
    if not s.worst_values:
        return 0.0
    return abs(s.worst_values[1] - s.worst_values[0]) / (s.atol + s.rtol * abs(s.worst_values[0]) or 1e-30)


def table(rows: list[OutputStats], full: bool = False) -> str:
    """One line per (point, pack, pair) showing its worst tensor; every failing tensor listed after."""
    lines = []
    if full:
        body = [_cols(s, s.output) for s in rows]
    else:
        groups: dict[tuple, list[OutputStats]] = {}
        for s in rows:
            groups.setdefault((s.point, s.pack, s.pair), []).append(s)
        body = []
        for group in groups.values():
            worst = max(group, key=_severity)
            failed = sum(not s.passed for s in group)
            label = f"{worst.output} (worst of {len(group)}{f', {failed} FAIL' if failed else ''})"
            body.append(_cols(worst, label))
    widths = [max(len(r[i]) for r in body + [HEADER]) for i in range(len(HEADER))]
    lines.append(_row(HEADER, widths))
    lines.append(_row(["-" * w for w in widths], widths))
    lines += [_row(r, widths) for r in body]
    failing = [s for s in rows if not s.passed]
    if failing and not full:
        lines.append("")
        lines.append(f"failing tensors ({len(failing)}):")
        fw = [max(len(r[i]) for r in [_cols(s, s.output) for s in failing] + [HEADER]) for i in range(len(HEADER))]
        lines.append(_row(HEADER, fw))
        lines += [_row(_cols(s, s.output), fw) for s in failing]
    return "\n".join(lines)


def worst_per_pair(rows: list[OutputStats]) -> dict:
    """Per runner pair: the largest errors anywhere, and the tensor closest to (or over) its bound."""
    out: dict[str, dict] = {}
    for pair in dict.fromkeys(s.pair for s in rows):
        mine = [s for s in rows if s.pair == pair]
        worst = max(mine, key=_severity)
        out[pair] = {"passed": all(s.passed for s in mine),
                     "max_abs": max(s.max_abs for s in mine), "max_rel": max(s.max_rel for s in mine),
                     "worst_tensor": {"output": worst.output, "point": worst.point, "pack": worst.pack,
                                      "max_abs": worst.max_abs, "index": list(worst.worst_index)},
                     "failing_tensors": [f"{s.point} pack{s.pack} {s.output}" for s in mine if not s.passed]}
    return out


# Polygraphy's --onnxrt has no flag for a session config entry, so it cannot set the int4
# accuracy level kvplan's own sessions use (kvplan.runtime.ort_session). ORT_ENABLE_BASIC keeps
# ONNX Runtime from fusing DequantizeLinear(INT4) -> MatMul into MatMulNBits at all (whose default
# accuracy level 4 quantizes the activations to int8): the re-check then runs the dequantized
# weights at the graph's own precision, as accuracy level 0 does.
INT4_ONNXRT_FLAGS = ["--graph-optimization-level", "ORT_ENABLE_BASIC"]


def onnxrt_flags(int4: bool) -> list[str]:
    return ["--onnxrt", *(INT4_ONNXRT_FLAGS if int4 else [])]


def recheck_command(model_file: str, runner_flags: list[str], inputs: str, outputs: str, atol: float,
                    rtol: float, env: str = "") -> str:
    cmd = ["polygraphy", "run", model_file, *runner_flags, "--load-inputs", inputs, "--load-outputs", outputs,
           "--atol", f"{atol:g}", "--rtol", f"{rtol:g}"]
    return (env + " " if env else "") + " ".join(shlex.quote(c) for c in cmd)


def task_summary(task: dict) -> list[str]:
    if not task.get("ran"):
        lines = [f"task-level checks: not run ({task.get('why')})"]
        return lines + [f"  {n:14s} not run: {r['why']}" for n, r in (task.get("stacks") or {}).items()]
    lines = [f"task-level checks ({task['mode']}, prompt {task['prompt_tokens']} tokens, {task['steps']} steps):"]
    for name, r in task["stacks"].items():
        if not r.get("ran"):
            lines.append(f"  {name:14s} not run: {r['why']}")
            continue
        div = "none" if r["first_divergence"] is None else f"step {r['first_divergence']}"
        d = r["drift"]
        over = "" if r["passed_tolerance"] else f"; OVER TOLERANCE from step {r['first_step_over_tolerance']}"
        lines.append(f"  {name:14s} token agreement {100 * r['agreement']:.1f}% (first divergence: {div}); "
                     f"hidden_out max abs error: step 0 {_fmt(d['first'])}, last {_fmt(d['last'])}, "
                     f"max {_fmt(d['max'])} at step {d['max_step']}, mean first/last quarter "
                     f"{_fmt(d['mean_first_quarter'])}/{_fmt(d['mean_last_quarter'])}{over}")
    return lines


def phase_table(meter, weight_bytes: int) -> list[str]:
    """Per phase: wall and CPU time and the process's peak RSS during it (and that peak over the weight bytes)."""
    def mib(x):
        return "-" if x is None else f"{x / 2**20:.0f} MiB"

    def ratio(x):
        return "" if x is None or not weight_bytes else f" ({x / weight_bytes:.1f}x weights)"

    phases = meter.merged()
    width = max([len(p.name) for p in phases] + [5])
    lines = [f"time and memory per phase (weights {mib(weight_bytes)}; CPU: the process's CPU time, all threads):"]
    lines += [f"  {p.name:{width}s} {p.seconds:7.1f} s  CPU {p.cpu_seconds:7.1f} s  peak RSS {mib(p.peak)}{ratio(p.peak)}"
              for p in phases]
    total, cpu = sum(p.seconds for p in meter.phases), sum(p.cpu_seconds for p in meter.phases)
    lines.append(f"  {'total':{width}s} {total:7.1f} s  CPU {cpu:7.1f} s  peak RSS {mib(meter.peak)}{ratio(meter.peak)}")
    return lines
