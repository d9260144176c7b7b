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

import contextlib
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from polygraphy.logger import G_LOGGER

from kvplan.decoder import pack_specs
from kvplan.errors import BackendError, UserError
from kvplan.export import TORCH_DTYPES, io_contract
from kvplan.fileio import temp_prefix
from kvplan.manifest import MANIFEST, load_manifest, now, sha256_file, write_json_atomic
from kvplan.models.presets import tensor_shapes
from kvplan.pipeline import collections_skip_what_exists, map_large_allocations, release_memory
from kvplan.trt.backend import select_backend, visible_gpus
from kvplan.validate import points as pts
from kvplan.validate import quantized, report, runners as rn, segments as seg_plan, stream, tokens
from kvplan.validate.meter import Meter
from kvplan.validate.onnx_stack import OnnxStack, Pack
from kvplan.validate.points import parse_kinds
from kvplan.validate.reference import HFReference
from kvplan.validate.task import TrtStack, run_task_checks

RECHECK_ENV_RTX = "POLYGRAPHY_USE_TENSORRT_RTX=1"
# (reference, candidate) runner pairs compared on every output of every point.
PAIRS = [(rn.REFERENCE, rn.EXPORT), (rn.REFERENCE, rn.FUSED), (rn.EXPORT, rn.FUSED),
         (rn.FUSED, rn.TENSORRT), (rn.REFERENCE, rn.TENSORRT)]
PAIR_ORDER = {f"{a} vs {b}": i for i, (a, b) in enumerate(PAIRS)}


@dataclass(frozen=True)
class ValidateOptions:
    """What to check and how hard; the CLI's flags of the same names."""
    points: str = "all"              # comma list of min, opt, max, masked, batch, or all
    prefill_dtype: str = "float32"   # float32 | profile: precision of the prefill producing the past KV
    reference_dtype: str = "float32" # float32 | profile: precision the reference computes in (on the profile dtype's weights)
    steps: int = 64                  # decode steps of the token and multi-step checks
    prompt_tokens: int = 8
    no_task: bool = False
    min_agreement: float = 0.95
    full: bool = False               # one table row per output tensor
    verbose: bool = False            # keep Polygraphy's own log
    # "auto": a single-pack graph runs in ranges of about RANGE_BYTES of weights; K > 1: in K ranges;
    # 0 or 1: the whole stack at once
    layer_ranges: int | str = "auto"
    # A text file the points are fed (read with the model's tokenizer); None: the text kvplan ships.
    text: Path | None = None

    def __post_init__(self):
        if self.steps < 1 or self.prompt_tokens < 1:
            raise UserError("--steps and --prompt-tokens must be >= 1")
        if self.layer_ranges != "auto" and (not isinstance(self.layer_ranges, int) or self.layer_ranges < 0):
            raise UserError(f"--layer-ranges must be auto or a number >= 0, got {self.layer_ranges!r}")
        for flag, value in (("--prefill-dtype", self.prefill_dtype), ("--reference-dtype", self.reference_dtype)):
            if value not in ("float32", "profile"):
                raise UserError(f"{flag}: {value!r} is not float32 or profile")
        parse_kinds(self.points)


def _artifacts(manifest: dict, stage: str, target: Path) -> list[Path] | None:
    rec = manifest.get("stages", {}).get(stage)
    if not rec:
        return None
    return [target / a["path"] for a in sorted(rec["artifacts"], key=lambda a: a.get("pack", 0))]


def validate(source, profile, target: Path, manifest: dict, options: ValidateOptions, backend_name: str,
             log=print) -> int:
    """Compare every built artifact of ``target`` (its ``manifest``) against transformers' model.

    Returns 0 pass, 1 numeric mismatch, 3 inconclusive (fewer than two runners could run).
    The caller has checked that the target is current and holds its lock.
    """
    # Polygraphy's per-runner INFO lines drown the table; scoped so callers keep their own level.
    quiet = contextlib.nullcontext() if options.verbose else G_LOGGER.verbosity(G_LOGGER.WARNING)
    (target / "validation").mkdir(exist_ok=True)
    # The layer ranges' graphs live as long as the checks, in a private directory removed after them
    # (marked: a killed validation leaves it to the next build).
    with quiet, collections_skip_what_exists(), \
            tempfile.TemporaryDirectory(prefix=temp_prefix(Path("ranges")), dir=target / "validation") as scratch:
        return _run_checks(options, parse_kinds(options.points), source, profile, target, manifest, backend_name,
                           log, Path(scratch))


def _run_checks(options, kinds, source, profile, target, manifest, backend_name, log, scratch: Path) -> int:
    t0 = time.perf_counter()
    map_large_allocations()
    meter = Meter(log)
    cfg = source.config
    tol = profile.tolerance
    specs = pack_specs(cfg, profile.decoder_pack_size, profile.kv_format, profile.kv_io, profile.cache_len)
    exported = _artifacts(manifest, "export", target)
    # An int4 target: its graphs are the quantize stage's, and the reference carries their weights.
    original = source
    source, exported = quantized.faithfulness_inputs(source, manifest, target, exported)
    quant = quantized.quantize_record(manifest)
    quality = []
    fused = _artifacts(manifest, "surgery", target)
    plans = _artifacts(manifest, "engines", target)
    backend, backend_error = None, None
    if plans is not None:
        caps, how = visible_gpus()
        if not caps:
            # Engines run only on a GPU: the TensorRT libraries (~100 MiB) are not even loaded.
            backend_error = f"engines run only on a CUDA GPU: {how}"
        else:
            try:
                backend = select_backend(backend_name)
            except BackendError as e:
                backend_error = str(e)
    hashed = (exported or []) + (fused or []) + (plans or [])      # the target's own artifacts
    dtype = TORCH_DTYPES[profile.dtype]
    log(f"[validate] {source.name} ({cfg.num_layers} layers, {profile.dtype}) profile {profile.name}: {target}")
    log(f"[validate] tolerance: |got - ref| <= atol + rtol * |ref| with atol={tol.atol:g}, rtol={tol.rtol:g}")
    points = pts.select_points(profile, kinds)
    longest = max(p.last for p in points)
    text = tokens.read_text(options.text) if options.text else None
    fp32_prefill = options.prefill_dtype == "float32" and dtype != torch.float32
    # The reference computes in float32 on the profile dtype's weights and inputs (exact in float32),
    # and rounds its outputs to the profile dtype: the graph's error against exact arithmetic on the
    # same numbers, at float32's speed (torch's fp16 CPU matmul runs at a quarter of it here).
    ref_dtype = torch.float32 if options.reference_dtype == "float32" else dtype
    vdir = target / "validation"           # made by validate()
    not_run: dict[str, str] = {}
    for name, paths in ((rn.EXPORT, exported), (rn.FUSED, fused)):
        if paths is None:
            not_run[name] = "no fused graph in this target (no surgery passes)"
    stems = [Path(p.name).name.removesuffix(".onnx") for p in exported]
    count = seg_plan.range_count(options.layer_ranges, cfg, specs, dtype)
    streamer = stream.Streamer(vdir, PAIRS, tol, meter, not_run, log,
                               why_not=lambda r, e: rn.onnxrt_why_not(r.kvplan_graph, e)
                               if hasattr(r, "kvplan_graph") else None)
    try:
        segments = []
        if count > 1:
            with meter.phase("layer ranges"):
                segments = seg_plan.cut(count, cfg, specs[0], exported[0], fused[0] if fused else None, scratch,
                                        explicit=options.layer_ranges != "auto", log=log)
            release_memory()
        if not segments:
            segments = [seg_plan.Segment(i, spec, {rn.EXPORT: exported[i], **({rn.FUSED: fused[i]} if fused else {})})
                        for i, spec in enumerate(specs)]
        cut = len(segments) > len(specs)          # a pack validated in layer ranges
        with meter.phase("prefill"):
            # Every position any point reads (its row's tokens up to lastSum + N), and the task check's prompt.
            inputs = tokens.validation_inputs(original, pts.points_batch(points),
                                              max(max(p.last + p.n for p in points), options.prompt_tokens), dtype,
                                              text)
            log(f"[validate] inputs: {inputs.describe()}")
            # Range by range: transformers' model of a few layers at a time, float32 only for the prefill.
            prefill = pts.Prefill(lambda layers: HFReference(source, torch.float32 if fp32_prefill else dtype,
                                                             layers=layers, norm=False),
                                  cfg, [seg.layers for seg in segments], inputs.hidden[:, :longest], dtype,
                                  directory=streamer.spill_root / "prefill", log=log if len(segments) > 1 else None)
            release_memory()
        log(f"[validate] prefill of {longest} tokens (shared by every point) in {meter.phases[-1].seconds:.1f} s")
        data = [pts.point_data(cfg, dtype, point, prefill, inputs.hidden) for point in points]
        jobs = [seg_plan.segment_jobs(s_index, seg, segments, specs, stems, profile, data, cfg) for s_index, seg in enumerate(segments)]
        trt_here = rn.make_tensorrt(plans[0] if plans else None, backend, backend_error, 0, specs[0])[0]
        later = {rn.EXPORT, rn.FUSED} | ({rn.TENSORRT} if trt_here is not None else set())
        # Runner by runner, range by range: only one runner's weights of one range are ever in memory.
        for s_index, seg in enumerate(segments):
            with meter.phase("reference"):
                ref = HFReference(source, ref_dtype, layers=seg.layers, norm=seg.spec.final_norm, round_to=dtype)
                # int4 targets: the full-precision model too, for the quality figures (not the verdict).
                last_pack = specs[seg.pack].final_norm
                ref_fp = (quantized.full_precision_reference(original, ref_dtype, seg.layers, seg.spec.final_norm, dtype)
                          if quant and last_pack else None)
            log(f"[validate] {seg.label(cut)}: {len(data)} point(s) through {rn.REFERENCE}")
            contract = io_contract(cfg, seg.spec, profile.batch_dim, profile.dtype)
            streamer.run(rn.ReferenceRunner(ref, seg.spec, contract, log=log, out_dtype=dtype), jobs[s_index], later)
            if ref_fp is not None:
                streamer.run(quantized.quality_runner(ref_fp, seg.spec, contract, log, dtype), jobs[s_index], set())
            del ref, ref_fp
            release_memory()
        for name in (rn.EXPORT, rn.FUSED):
            later.discard(name)
            for s_index, seg in enumerate(segments):
                if name in not_run:          # no such graph, or it failed to start for an earlier pack
                    break
                runner, _ = rn.make_onnxrt(seg.graphs[name], name)
                runner.kvplan_graph = seg.graphs[name]
                log(f"[validate] {seg.label(cut)}: {len(data)} point(s) through {name}")
                streamer.run(runner, jobs[s_index], later)
                release_memory()
        pack_jobs = [seg_plan.pack_jobs(p_index, spec, segments, stems, profile, data) for p_index, spec in enumerate(specs)]
        for p_index, spec in enumerate(specs):
            for job in pack_jobs[p_index]:
                sp_index = job.group[0].point.profile_index
                runner, why = rn.make_tensorrt(plans[p_index] if plans else None, backend, backend_error,
                                               sp_index, spec)
                if runner is None:
                    not_run.setdefault(rn.TENSORRT, why)
                    continue
                log(f"[validate] {job.base}: {len(job.group)} point(s) through {rn.TENSORRT}")
                streamer.run(runner, [job], set())
    finally:
        streamer.close()
    rows = streamer.rows
    ran = {n for names in streamer.ran.values() for n in names}
    for p_index, spec in enumerate(specs):
        for job in pack_jobs[p_index] if quant and spec.final_norm else ():
            if {rn.EXPORT, quantized.QUALITY_RUNNER} <= set(streamer.ran.get(job.base, [])):
                quality += quantized.quality_rows_from_files(vdir, job.base, [d.point for d in job.group], rn.EXPORT)
    files, commands = [], []
    for p_index, spec in enumerate(specs):
        for job in pack_jobs[p_index]:
            sp_index = job.group[0].point.profile_index
            files += [str(w.relative_to(target)) for w in streamer.written.get(job.base, [])]
            commands += _commands(target, stems[p_index], sp_index, profile.shapes[sp_index].name, exported[p_index],
                                  fused, plans, p_index, set(streamer.ran.get(job.base, [])), backend_name, tol,
                                  int4=bool(quant))
    # The points' inputs (the shared prefill cache above all) are not needed by the task check.
    labels = [d.point.label for d in data]
    prompt = inputs.prompt(options.prompt_tokens, cfg.vocab_size)
    del data, jobs, pack_jobs, prefill
    inputs.hidden = None
    release_memory()

    task = {"ran": False, "why": "--no-task"}
    if not options.no_task:
        with meter.phase("task check"):
            task = _task_checks(options, source, dtype, specs, segments, plans, backend, backend_error,
                                profile, not_run, prompt, log)
        release_memory()

    quality_task = {"ran": False, "why": "not an int4 target" if not quant else "--no-task"}
    if quant and not options.no_task:
        with meter.phase("quality task check"):
            quality_task = quantized.quality_task(original, dtype, [seg.spec for seg in segments],
                                                  [seg.graphs[rn.EXPORT] for seg in segments], options,
                                                  prompt, profile.tolerance, log)
        release_memory()

    # Report rows point by point (they were produced pack/profile/runner by runner).
    order = {label: i for i, label in enumerate(labels)}
    rows.sort(key=lambda s: (s.pack, order[s.point], PAIR_ORDER.get(s.pair, 99)))

    # Verdict.
    compared = {s.pair for s in rows}
    mismatch = [s for s in rows if not s.passed]
    task_bad = []
    for name, r in (task.get("stacks") or {}).items():
        if r.get("ran") and not r["passed_tolerance"]:
            task_bad.append(f"{name}: multi-step hidden_out over tolerance from step {r['first_step_over_tolerance']}")
        if r.get("ran") and r["agreement"] < options.min_agreement:
            task_bad.append(f"{name}: token agreement {100 * r['agreement']:.1f}% < {100 * options.min_agreement:.0f}%")
    status = "fail" if mismatch or task_bad else ("pass" if compared else "inconclusive")

    print()
    print(f"runners ({source.name}, profile {profile.name}, {profile.dtype}):")
    for name in (rn.REFERENCE, rn.EXPORT, rn.FUSED, rn.TENSORRT):
        print(f"  {name:14s} " + ("ran" if name in ran else f"NOT RUN: {not_run.get(name, 'not available')}"))
    print()
    print(report.table(rows, full=options.full) if rows else "no two runners ran: nothing was compared")
    print()
    for line in report.task_summary(task):
        print(line)
    print()
    weight_bytes = sum(math.prod(s) for s in tensor_shapes(cfg).values()) * torch.finfo(dtype).bits // 8
    for line in report.phase_table(meter, weight_bytes):
        print(line)
    print()
    if quant:
        for line in quantized.summary(quant.get("method", "int4"), quality, quality_task):
            print(line)
        print()
    print(f"Polygraphy JSON inputs/outputs: {vdir}")
    print(f"re-check without kvplan or PyTorch (from {target}):")
    for c in commands:
        print(f"  {c}")
    print()
    verdict = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE (nothing compared)"}[status]
    # A layer range is named by its layers (its pack index would not tell which).
    where = [seg.label(cut) for seg in segments]
    detail = [f"{s.point} {where[s.pack]} {s.pair}: {s.output}" for s in mismatch] + task_bad
    print(f"validation {verdict}" + (": " + "; ".join(detail[:20]) + (" ..." if len(detail) > 20 else "") if detail else ""))

    record = {"status": status, "finished": now(), "seconds": round(time.perf_counter() - t0, 2),
              "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "rule": "|got - ref| <= atol + rtol * |ref|"},
              "points": labels, "inputs": inputs.record, "prefill_dtype": "float32" if fp32_prefill else profile.dtype,
              "reference_dtype": str(ref_dtype).removeprefix("torch."),
              "runners": {n: ({"ran": True} if n in ran else {"ran": False, "why": not_run.get(n, "not available")})
                          for n in (rn.REFERENCE, rn.EXPORT, rn.FUSED, rn.TENSORRT)},
              "pairs": report.worst_per_pair(rows), "task": _task_record(task),
              "phases": [p.to_dict() for p in meter.merged()],
              "peak_rss_mib": None if meter.peak is None else round(meter.peak / 2**20, 1),
              "weight_mib": round(weight_bytes / 2**20, 1),
              **({"quality": {"method": quant.get("method"), "points": quality,
                              "task": _task_record(quality_task)}} if quant else {}),
              "files": files, "recheck": commands,
              **({"layer_ranges": [f"{s.spec.first_layer}..{s.spec.last_layer - 1}" for s in segments]}
                 if cut else {}),
              "artifacts": {str(p.relative_to(target)): sha256_file(p) for p in hashed}}
    current = load_manifest(target)
    if current is None or current.get("stages") != manifest.get("stages"):
        print("warning: manifest changed during validation; validation record not written", file=sys.stderr)
    else:
        current["validation"] = record
        write_json_atomic(target / MANIFEST, current)
    return {"pass": 0, "fail": 1, "inconclusive": 3}[status]


def _commands(target, stem, sp_index, sp_name, onnx_path, fused, plans, p_index, names, backend_name, tol,
              int4: bool = False) -> list[str]:
    base = f"validation/{stem}.{sp_name}"
    inputs = f"{base}.inputs.json"
    cmds = []
    graph, graph_runner = (fused[p_index], rn.FUSED) if fused else (onnx_path, rn.EXPORT)
    graph = str(graph.relative_to(target))
    if rn.REFERENCE in names and graph_runner in names:
        cmds.append(report.recheck_command(graph, report.onnxrt_flags(int4), inputs,
                                           f"{base}.outputs.{rn.REFERENCE}.json",
                                           tol.atol, tol.rtol))
    if plans:    # in-place outputs too: polygraphy run binds them to their inputs (Polygraphy >= 0.50.3)
        # The engine is checked against ONNX Runtime on the graph it was built from when that ran here,
        # else against the PyTorch reference (bfloat16 on a CPU host).
        want = rn.FUSED if rn.FUSED in names else rn.EXPORT if rn.EXPORT in names else rn.REFERENCE
        env = RECHECK_ENV_RTX if (backend_name or "").endswith("rtx") or backend_name == "auto" else ""
        cmds.append(report.recheck_command(plans[p_index].name, ["--model-type", "engine", "--trt",
                                                                 "--optimization-profile", str(sp_index)],
                                           inputs, f"{base}.outputs.{want}.json", tol.atol, tol.rtol, env))
    return cmds


def _task_checks(options, source, dtype, specs, segments, plans, backend, backend_error, profile, not_run, prompt,
                 log):
    stacks: dict = {}
    for name in (rn.EXPORT, rn.FUSED):
        if name not in segments[0].graphs:
            continue
        if name in not_run:
            stacks[name] = not_run[name]
            continue
        # 64 small steps per graph: the casts folded once (the default level), range by range.
        stacks[name] = OnnxStack([Pack(seg.spec, seg.graphs[name]) for seg in segments], fold_casts=True)
    with contextlib.ExitStack() as active:
        trt_runners, why = [], None
        for i in range(len(specs)):
            runner, why = rn.make_tensorrt(plans[i] if plans else None, backend, backend_error, 0, specs[i])
            if runner is None:
                break
            trt_runners.append(active.enter_context(runner))
        stacks[rn.TENSORRT] = why if why else TrtStack(trt_runners, specs, profile)
        steps = options.steps
        if profile.kv_io == "inplace":
            # The prompt and every generated token but the last must fit the buffer.
            steps = max(1, min(steps, profile.cache_len - options.prompt_tokens + 1))
            if steps < options.steps:
                log(f"[validate] task check: {steps} steps, not {options.steps}: the in-place buffer has "
                    f"{profile.cache_len} rows and the prompt {options.prompt_tokens} tokens")
        return run_task_checks(source, dtype, stacks, steps, prompt, profile.tolerance, log)


def _task_record(task: dict) -> dict:
    """The manifest keeps the summary, not 64 per-step numbers per stack."""
    out = {k: v for k, v in task.items() if k != "stacks"}
    if "stacks" in task:
        out["stacks"] = {n: {k: v for k, v in r.items() if k != "hidden_max_abs_per_step"}
                         for n, r in task["stacks"].items()}
    return out


