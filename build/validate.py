"""Validation: prove with Polygraphy that every stage preserves the model's numbers.

    python -m build.validate --profile fp16 [--model M] [--out engines] [--points opt]

Checks the artifacts already built under OUT/<model>/<profile>/ (never rebuilds;
stale or missing artifacts are reported, exit 2), runs transformers' own model,
ONNX Runtime on the exported and fused graphs and TensorRT on the engine (where
this machine can run it) on realistic inputs, compares every output, saves the
inputs and outputs as Polygraphy JSON under <target>/validation/ and records the
verdict in manifest.json.

Exit codes: 0 pass, 1 numeric mismatch, 2 stale/missing target or bad input,
3 inconclusive (fewer than two runners could run, e.g. bfloat16 on a CPU-only host).
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

from . import profiles as profiles_mod
from .config import ConfigError
from .models import DEFAULT_MODEL, ModelError

RECHECK_ENV_RTX = "POLYGRAPHY_USE_TENSORRT_RTX=1"


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m build.validate",
                                description="Check a built target's ONNX graphs and engines against transformers' "
                                            "model with Polygraphy; never rebuilds.")
    p.add_argument("--profile", default=profiles_mod.DEFAULT_PROFILE, help="build profile name or .toml path")
    p.add_argument("--model", default=DEFAULT_MODEL, help="preset name or checkpoint directory (as for build.engines)")
    p.add_argument("--out", default="engines", type=Path, help="output root the target was built under")
    p.add_argument("--backend", default=None, choices=("auto", "tensorrt", "tensorrt-rtx"),
                   help="TensorRT flavour (default: the one that built the engine)")
    p.add_argument("--no-surgery", action="store_true", help="the target was built with --no-surgery")
    p.add_argument("--points", default="all",
                   help="comma list of min, opt, max, masked per optimization profile, or all (default: all)")
    p.add_argument("--prefill-dtype", choices=("float32", "profile"), default="float32",
                   help="precision of the prefill that produces the past KV (input data, not under test): "
                        "float32 (fast on CPU, then rounded to the profile dtype) or the profile's own "
                        "(default: %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="decode steps of the token/multi-step checks (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length of the token check (default: 8)")
    p.add_argument("--no-task", action="store_true", help="skip the token-agreement and multi-step checks")
    p.add_argument("--min-agreement", type=float, default=0.95,
                   help="lowest teacher-forced top-1 agreement that passes (default: %(default)s)")
    p.add_argument("--full", action="store_true", help="print one table row per output tensor")
    p.add_argument("--verbose", action="store_true", help="keep Polygraphy's own log")
    return p.parse_args(argv)


def _blocking(problem) -> bool:
    """A target built without engines (--stop-after surgery) or checked on a host without a TensorRT
    backend is still validated for what it has; anything else (stale, modified) stops us."""
    return not (problem.stage == "engines" and problem.kind in ("not-built", "no-backend"))


def _artifacts(manifest: dict, stage: str, target: Path) -> list[Path] | None:
    rec = manifest.get("stages", {}).get(stage)
    if not rec:
        return None
    return [target / a["path"] for a in sorted(rec["artifacts"], key=lambda a: a.get("pack", 0))]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    try:
        from .validation.points import parse_kinds
        kinds = parse_kinds(args.points)
        if args.steps < 1 or args.prompt_tokens < 1:
            raise ValueError("--steps and --prompt-tokens must be >= 1")
        return _validate(args, kinds, log)
    except (ModelError, ConfigError, profiles_mod.ProfileError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _check_target(args, log):
    from .engines import target_state
    from .manifest import load_manifest
    from .models import resolve
    profile = profiles_mod.load(args.profile)
    target_guess = args.out / resolve(args.model).name / profile.name
    recorded = (load_manifest(target_guess) or {}).get("stages", {})
    backend = args.backend or recorded.get("engines", {}).get("backend", "auto")
    no_surgery = args.no_surgery or ("surgery" not in recorded and "export" in recorded and "engines" in recorded)
    return target_state(args.model, args.profile, args.out, backend=backend, no_surgery=no_surgery), backend


def _validate(args, kinds, log) -> int:
    state, backend_name = _check_target(args, log)
    hard = [p for p in state.problems if _blocking(p)]
    if state.manifest is None or hard:
        print(f"error: target {state.target} is stale or incomplete; nothing was validated or rebuilt:",
              file=sys.stderr)
        for p in hard or state.problems:
            print(f"  - {p}", file=sys.stderr)
        return 2
    from .manifest import target_lock
    with target_lock(state.target, log=log):
        again, _ = _check_target(args, log)
        if [p for p in again.problems if _blocking(p)]:
            print(f"error: target {state.target} changed while waiting for its lock (stale): "
                  + "; ".join(map(str, again.problems)), file=sys.stderr)
            return 2
        return _run(args, kinds, again, backend_name, log)


def _run(args, kinds, state, backend_name, log) -> int:
    from polygraphy.logger import G_LOGGER
    # Polygraphy's per-runner INFO lines drown the table; scoped so callers keep their own level.
    quiet = contextlib.nullcontext() if args.verbose else G_LOGGER.verbosity(G_LOGGER.WARNING)
    with quiet:
        return _run_checks(args, kinds, state, backend_name, log)


def _run_checks(args, kinds, state, backend_name, log) -> int:
    import torch
    from polygraphy.comparator import Comparator

    from .decoder import pack_specs
    from .export import TORCH_DTYPES, io_contract
    from .manifest import MANIFEST, load_manifest, now, sha256_file, write_json_atomic
    from .reference import HFReference
    from .validation import points as pts
    from .validation import report, runners as rn
    from .validation.compare import compare_runs

    t0 = time.perf_counter()
    source, profile, target, manifest = state.source, state.profile, state.target, state.manifest
    cfg = source.config
    tol = profile.tolerance
    specs = pack_specs(cfg, profile.decoder_pack_size, profile.kv_format, profile.kv_io, profile.cache_len)
    exported = _artifacts(manifest, "export", target)
    fused = _artifacts(manifest, "surgery", target)
    plans = _artifacts(manifest, "engines", target)
    backend, backend_error = None, None
    if plans is not None:
        try:
            from .backend import select_backend
            backend = select_backend(backend_name)
        except Exception as e:
            backend_error = str(e)
    dtype = TORCH_DTYPES[profile.dtype]
    log(f"[validate] {source.name} ({cfg.num_layers} layers, {profile.dtype}) profile {profile.name}: {target}")
    log(f"[validate] tolerance: |got - ref| <= atol + rtol * |ref| with atol={tol.atol:g}, rtol={tol.rtol:g}")
    ref = HFReference(source, dtype)
    prefill_ref = None
    if args.prefill_dtype == "float32" and dtype != torch.float32:
        prefill_ref = HFReference(source, torch.float32)
    points = pts.select_points(profile, kinds)
    need = [s.first_layer for s in specs]
    t = time.perf_counter()
    longest = max(p.last for p in points)
    prefill = pts.Prefill(prefill_ref or ref, profile.batch, longest)
    log(f"[validate] prefill of {longest} tokens (shared by every point) in {time.perf_counter() - t:.1f} s")
    data = []
    for i, point in enumerate(points):
        t = time.perf_counter()
        data.append(pts.point_data(ref, point, profile.batch, need, prefill_ref, prefill))
        log(f"[validate] point {i + 1}/{len(points)} {point.label}{' (reserved slots masked)' if point.masked else ''}"
            f": prefill + inputs in {time.perf_counter() - t:.1f} s")

    vdir = target / "validation"
    vdir.mkdir(exist_ok=True)
    rows, not_run, ran, files, commands = [], {}, set(), [], []
    for p_index, spec in enumerate(specs):
        stem = Path(exported[p_index].name).name.removesuffix(".onnx")
        contract = io_contract(cfg, spec, profile.batch, profile.dtype)
        for sp_index, sp in enumerate(profile.shapes):
            group = [d for d in data if d.point.profile_index == sp_index]
            if not group:
                continue
            feeds = [pts.feed_for(d, spec) for d in group]
            runners = [rn.ReferenceRunner(ref, spec, contract, log=log)]
            for name, paths in ((rn.EXPORT, exported), (rn.FUSED, fused)):
                if paths is None:
                    not_run[name] = "no fused graph in this target (no surgery passes)"
                    continue
                runner, why = rn.make_onnxrt(paths[p_index], name)
                runner and runners.append(runner)
                why and not_run.setdefault(name, why)
            runner, why = rn.make_tensorrt(plans[p_index] if plans else None, backend, backend_error, sp_index,
                                              specs[p_index])
            runner and runners.append(runner)
            why and not_run.setdefault(rn.TENSORRT, why)
            log(f"[validate] pack {p_index} ({stem}), profile {sp.name}: {len(group)} point(s) through "
                f"{', '.join(r.name for r in runners)}")
            results = Comparator.run(runners, data_loader=feeds)
            ran.update(r.name for r in runners)
            pairs = [(rn.REFERENCE, rn.EXPORT), (rn.REFERENCE, rn.FUSED), (rn.EXPORT, rn.FUSED),
                     (rn.FUSED, rn.TENSORRT), (rn.REFERENCE, rn.TENSORRT)]
            rows += compare_runs(results, pairs, [d.point for d in group], p_index, tol.atol, tol.rtol)
            files += _save(results, feeds, vdir, f"{stem}.{sp.name}", target)
            commands += _commands(stem, sp_index, sp.name, exported[p_index], fused, plans, p_index, results,
                                  backend_name, tol, spec.kv_io == "inplace")

    task = {"ran": False, "why": "--no-task"}
    if not args.no_task:
        task = _task_checks(args, source, dtype, specs, exported, fused, plans, backend, backend_error, profile,
                            not_run, log)

    # Report rows point by point (they were produced pack/profile/pair by pair).
    order = {d.point.label: i for i, d in enumerate(data)}
    rows.sort(key=lambda s: (s.pack, order[s.point]))

    # Verdict.
    compared = {s.pair for s in rows}
    mismatch = [s for s in rows if not s.passed]
    task_bad = []
    for name, r in (task.get("stacks") or {}).items():
        if r.get("ran") and not r["passed_tolerance"]:
            task_bad.append(f"{name}: multi-step hidden_out over tolerance from step {r['first_step_over_tolerance']}")
        if r.get("ran") and r["agreement"] < args.min_agreement:
            task_bad.append(f"{name}: token agreement {100 * r['agreement']:.1f}% < {100 * args.min_agreement:.0f}%")
    status = "fail" if mismatch or task_bad else ("pass" if compared else "inconclusive")

    print()
    print(f"runners ({source.name}, profile {profile.name}, {profile.dtype}):")
    for name in (rn.REFERENCE, rn.EXPORT, rn.FUSED, rn.TENSORRT):
        print(f"  {name:14s} " + ("ran" if name in ran else f"NOT RUN: {not_run.get(name, 'not available')}"))
    print()
    print(report.table(rows, full=args.full) if rows else "no two runners ran: nothing was compared")
    print()
    for line in report.task_summary(task):
        print(line)
    print()
    print(f"Polygraphy JSON inputs/outputs: {vdir}")
    print(f"re-check without kvplan or PyTorch (from {target}):")
    for c in commands:
        print(f"  {c}")
    print()
    verdict = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE (nothing compared)"}[status]
    detail = [f"{s.point} pack{s.pack} {s.pair}: {s.output}" for s in mismatch] + task_bad
    print(f"validation {verdict}" + (": " + "; ".join(detail[:20]) + (" ..." if len(detail) > 20 else "") if detail else ""))

    record = {"status": status, "finished": now(), "seconds": round(time.perf_counter() - t0, 2),
              "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "rule": "|got - ref| <= atol + rtol * |ref|"},
              "points": [d.point.label for d in data], "prefill_dtype": "float32" if prefill_ref else profile.dtype,
              "runners": {n: ({"ran": True} if n in ran else {"ran": False, "why": not_run.get(n, "not available")})
                          for n in (rn.REFERENCE, rn.EXPORT, rn.FUSED, rn.TENSORRT)},
              "pairs": report.worst_per_pair(rows), "task": _task_record(task),
              "files": files, "recheck": commands,
              "artifacts": {str(p.relative_to(target)): sha256_file(p)
                            for p in (exported or []) + (fused or []) + (plans or [])}}
    current = load_manifest(target)
    if current is None or current.get("stages") != manifest.get("stages"):
        print("warning: manifest changed during validation; validation record not written", file=sys.stderr)
    else:
        current["validation"] = record
        write_json_atomic(target / MANIFEST, current)
    return {"pass": 0, "fail": 1, "inconclusive": 3}[status]


def _save(results, feeds, vdir: Path, base: str, target: Path) -> list[str]:
    """inputs.json (Polygraphy data-loader list) and one RunResults file per runner."""
    from polygraphy.comparator import RunResults
    from polygraphy.json import save_json
    inputs = vdir / f"{base}.inputs.json"
    save_json(feeds, str(inputs), description="validation inputs")
    written = [inputs]
    for name, iterations in results:
        path = vdir / f"{base}.outputs.{name}.json"
        RunResults([(name, iterations)]).save(str(path))
        written.append(path)
    return [str(p.relative_to(target)) for p in written]


def _commands(stem, sp_index, sp_name, onnx_path, fused, plans, p_index, results, backend_name, tol,
              inplace: bool = False) -> list[str]:
    from .validation import report, runners as rn
    names = {name for name, _ in results}
    base = f"validation/{stem}.{sp_name}"
    inputs = f"{base}.inputs.json"
    cmds = []
    graph, graph_runner = (fused[p_index].name, rn.FUSED) if fused else (onnx_path.name, rn.EXPORT)
    if rn.REFERENCE in names and graph_runner in names:
        cmds.append(report.recheck_command(graph, ["--onnxrt"], inputs, f"{base}.outputs.{rn.REFERENCE}.json",
                                           tol.atol, tol.rtol))
    if plans and not inplace:    # polygraphy run cannot bind in-place outputs to their inputs
        # The engine is checked against ONNX Runtime on the graph it was built from when that ran here,
        # else against the PyTorch reference (bfloat16 on a CPU host).
        want = rn.FUSED if rn.FUSED in names else rn.EXPORT if rn.EXPORT in names else rn.REFERENCE
        env = RECHECK_ENV_RTX if (backend_name or "").endswith("rtx") or backend_name == "auto" else ""
        cmds.append(report.recheck_command(plans[p_index].name, ["--model-type", "engine", "--trt",
                                                                 "--optimization-profile", str(sp_index)],
                                           inputs, f"{base}.outputs.{want}.json", tol.atol, tol.rtol, env))
    return cmds


def _task_checks(args, source, dtype, specs, exported, fused, plans, backend, backend_error, profile, not_run, log):
    from .onnx_stack import OnnxStack, Pack
    from .validation import runners as rn
    from .validation.task import TrtStack, run_task_checks
    stacks: dict = {}
    for name, paths in ((rn.EXPORT, exported), (rn.FUSED, fused)):
        if paths is None:
            continue
        if name in not_run:
            stacks[name] = not_run[name]
            continue
        stacks[name] = OnnxStack([Pack(s, p) for s, p in zip(specs, paths)])
    with contextlib.ExitStack() as active:
        trt_runners, why = [], None
        for i in range(len(specs)):
            runner, why = rn.make_tensorrt(plans[i] if plans else None, backend, backend_error, 0, specs[i])
            if runner is None:
                break
            trt_runners.append(active.enter_context(runner))
        stacks[rn.TENSORRT] = why if why else TrtStack(trt_runners, specs, profile)
        steps = args.steps
        if profile.kv_io == "inplace":
            # The prompt and every generated token but the last must fit the buffer.
            steps = max(1, min(steps, profile.cache_len - args.prompt_tokens + 1))
            if steps < args.steps:
                log(f"[validate] task check: {steps} steps, not {args.steps}: the in-place buffer has "
                    f"{profile.cache_len} rows and the prompt {args.prompt_tokens} tokens")
        return run_task_checks(source, dtype, stacks, steps, args.prompt_tokens, profile.tolerance, log)


def _task_record(task: dict) -> dict:
    """The manifest keeps the summary, not 64 per-step numbers per stack."""
    out = {k: v for k, v in task.items() if k != "stacks"}
    if "stacks" in task:
        out["stacks"] = {n: {k: v for k, v in r.items() if k != "hidden_max_abs_per_step"}
                         for n, r in task["stacks"].items()}
    return out


if __name__ == "__main__":
    sys.exit(main())
