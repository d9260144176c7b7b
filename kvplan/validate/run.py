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
import functools
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from polygraphy.logger import G_LOGGER

from kvplan.errors import BackendError, UserError
from kvplan.export import TORCH_DTYPES, io_contract
from kvplan.fileio import temp_prefix
from kvplan.lazy import lazy_import
from kvplan.manifest import MANIFEST, load_manifest, now, sha256_file, write_json_atomic
from kvplan.models.presets import tensor_shapes
from kvplan.pipeline import collections_skip_what_exists, map_large_allocations, release_memory
from kvplan.stack import export_specs
from kvplan.trt.backend import select_backend, visible_gpus
from kvplan.validate import perplexity, quantized, report, stream, tokens, whole_step
from kvplan.validate import points as pts
from kvplan.validate import runners as rn
from kvplan.validate import segments as seg_plan
from kvplan.validate.meter import Meter
from kvplan.validate.onnx_stack import OnnxStack, Pack
from kvplan.validate.points import parse_kinds
from kvplan.validate.reference import HFReference
from kvplan.validate.task import TrtStack, run_task_checks

torch = lazy_import("torch")

RECHECK_ENV_RTX = "POLYGRAPHY_USE_TENSORRT_RTX=1"


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
    The caller has checked that the target is current and holds its lock. The progress lines and
    the final report both go to ``log``.
    """
    # Polygraphy's per-runner INFO lines drown the table; scoped so callers keep their own level.
    quiet = contextlib.nullcontext() if options.verbose else G_LOGGER.verbosity(G_LOGGER.WARNING)
    (target / "validation").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    # The layer ranges' graphs live as long as the checks, in a private directory removed after them
    # (marked: a killed validation leaves it to the next build).
    with quiet, collections_skip_what_exists(), \
            tempfile.TemporaryDirectory(prefix=temp_prefix(Path("ranges")), dir=target / "validation") as scratch:
        map_large_allocations()
        meter = Meter(log)
        plan = _plan(options, source, profile, target, manifest, backend_name)
        outcome = _run(plan, options, meter, Path(scratch), log)
    verdict = _verdict(outcome, options)
    for line in _report(plan, outcome, verdict, meter, options):
        log(line)
    _record(plan, outcome, verdict, meter, manifest, time.perf_counter() - t0, log)
    return {"pass": 0, "fail": 1, "inconclusive": 3}[verdict.status]


# --- plan: what will run, decided before anything runs ---

@dataclass
class Plan:
    source: object               # the reference's source: an int4 target's carries the int4 weights
    original: object             # the model as given (its full-precision weights)
    profile: object
    target: Path
    backend_name: str
    specs: list
    exported: list[Path]         # an int4 target's: the quantize stage's graphs
    fused: list[Path] | None
    plans: list[Path] | None
    quant: dict | None           # the quantize stage's record of an int4 target
    backend: object
    backend_error: str | None
    points: list
    text: str | None
    dtype: torch.dtype
    ref_dtype: torch.dtype
    fp32_prefill: bool
    range_count: int
    not_run: dict[str, str]      # runner -> why it did not run
    manifest: dict

    @property
    def packs(self) -> list[Pack]:
        """The decoder graphs a runtime drives: the fused ones where surgery ran."""
        return [Pack(spec, path) for spec, path in zip(self.specs, self.fused or self.exported)]

    @property
    def vdir(self) -> Path:
        return self.target / "validation"

    @property
    def stems(self) -> list[str]:
        return [Path(p.name).name.removesuffix(".onnx") for p in self.exported]

    @functools.cached_property
    def weight_bytes(self) -> int:
        """The decoder's weights in the profile dtype (the phase table's and the record's yardstick)."""
        return sum(math.prod(s) for s in tensor_shapes(self.source.config).values()) * torch.finfo(self.dtype).bits // 8

    @property
    def hashed(self) -> list[Path]:
        """The target's own artifacts, as validated."""
        return (self.exported or []) + (self.fused or []) + (self.plans or [])


def _engine_backend(plans, backend_name: str):
    """(backend, None), or (None, why the engines cannot run here)."""
    if plans is None:
        return None, None
    caps, how = visible_gpus()
    if not caps:
        # Engines run only on a GPU: the TensorRT libraries (~100 MiB) are not even loaded.
        return None, f"engines run only on a CUDA GPU: {how}"
    try:
        return select_backend(backend_name), None
    except BackendError as e:
        return None, str(e)


def _plan(options, source, profile, target, manifest, backend_name) -> Plan:
    cfg = source.config
    dtype = TORCH_DTYPES[profile.dtype]
    specs = export_specs(cfg, profile.export)
    # An int4 target: its graphs are the quantize stage's, and the reference carries their weights.
    quantized_source, exported = quantized.faithfulness_inputs(source, manifest, target,
                                                                _artifacts(manifest, "export", target))
    fused, plans = _artifacts(manifest, "surgery", target), _artifacts(manifest, "engines", target)
    backend, backend_error = _engine_backend(plans, backend_name)
    not_run = {name: "no fused graph in this target (no surgery passes)"
               for name, paths in zip(rn.GRAPH_RUNNERS, (exported, fused)) if paths is None}
    return Plan(source=quantized_source, original=source, profile=profile, target=target, backend_name=backend_name,
                specs=specs, exported=exported, fused=fused, plans=plans, quant=quantized.quantize_record(manifest),
                backend=backend, backend_error=backend_error,
                points=pts.select_points(profile, parse_kinds(options.points)),
                text=tokens.read_text(options.text) if options.text else None, dtype=dtype,
                # The reference computes in float32 on the profile dtype's weights and inputs (exact in
                # float32), and rounds its outputs to the profile dtype: the graph's error against exact
                # arithmetic on the same numbers, at float32's speed (torch's fp16 CPU matmul runs at a
                # quarter of it here).
                ref_dtype=torch.float32 if options.reference_dtype == "float32" else dtype,
                fp32_prefill=options.prefill_dtype == "float32" and dtype != torch.float32,
                range_count=seg_plan.range_count(options.layer_ranges, cfg, specs, dtype), not_run=not_run,
                manifest=manifest)


# --- run: every runner over every point, range by range ---

@dataclass
class Outcome:
    rows: list                   # one compared output per row (report.table's)
    ran: set[str]
    segments: list
    cut: bool                    # a pack was validated in layer ranges
    labels: list[str]            # the points, in report order
    inputs_record: dict
    quality: list
    files: list[str]
    commands: list[str]
    task: dict
    quality_task: dict
    whole_step: dict


def _run(plan: Plan, options, meter: Meter, scratch: Path, log) -> Outcome:
    cfg, profile = plan.source.config, plan.profile
    log(f"[validate] {plan.source.name} ({cfg.num_layers} layers, {profile.dtype}) profile {profile.name}: "
        f"{plan.target}")
    log(f"[validate] tolerance: |got - ref| <= atol + rtol * |ref| with atol={profile.validate.atol:g}, "
        f"rtol={profile.validate.rtol:g}")
    streamer = stream.Streamer(plan.vdir, rn.PAIRS, profile.validate, meter, plan.not_run, log,
                               why_not=lambda r, e: rn.onnxrt_why_not(r.kvplan_graph, e)
                               if hasattr(r, "kvplan_graph") else None,
                               measures=[quantized.quality_measure(rn.EXPORT)] if plan.quant else ())
    try:
        segments = _segments(plan, options, meter, scratch, log)
        inputs, prefill = _prefill(plan, options, segments, streamer, meter, log)
        data = [pts.point_data(cfg, plan.dtype, point, prefill, inputs.hidden) for point in plan.points]
        jobs = [seg_plan.segment_jobs(s_index, seg, segments, plan.specs, plan.stems, profile, data, cfg)
                for s_index, seg in enumerate(segments)]
        cut = len(segments) > len(plan.specs)
        trt_here = rn.make_tensorrt(plan.plans[0] if plan.plans else None, plan.backend, plan.backend_error, 0,
                                    plan.specs[0])[0]
        later = set(rn.GRAPH_RUNNERS) | ({rn.TENSORRT} if trt_here is not None else set())
        _through_references(plan, segments, jobs, streamer, later, meter, cut, len(data), log)
        _through_graphs(plan, segments, jobs, streamer, later, cut, len(data), log)
        pack_jobs = [seg_plan.pack_jobs(p_index, spec, segments, plan.stems, profile, data)
                     for p_index, spec in enumerate(plan.specs)]
        _through_engines(plan, pack_jobs, streamer, log)
    finally:
        streamer.close()
    quality, files, commands = _collected(plan, pack_jobs, streamer)
    # The points' inputs (the shared prefill cache above all) are not needed by the task checks.
    labels = [d.point.label for d in data]
    prompt = inputs.prompt(options.prompt_tokens, cfg.vocab_size)
    inputs_record = inputs.record
    ids = inputs.ids[0].tolist() if inputs.ids is not None else []
    del data, jobs, pack_jobs, prefill, inputs
    release_memory()
    task, quality_task = _task_phases(plan, options, segments, prompt, meter, log)
    with meter.phase("whole step"):
        whole = whole_step.whole_step(plan.source, profile, plan.target, plan.manifest, plan.packs, ids, log)
    release_memory()
    # Report rows point by point (they were produced pack/profile/runner by runner).
    order = {label: i for i, label in enumerate(labels)}
    rows = sorted(streamer.rows, key=lambda s: (s.pack, order[s.point], rn.PAIR_ORDER.get(s.pair, 99)))
    return Outcome(rows=rows, ran={n for names in streamer.ran.values() for n in names}, segments=segments, cut=cut,
                   labels=labels, inputs_record=inputs_record, quality=quality, files=files, commands=commands,
                   task=task, quality_task=quality_task, whole_step=whole)


def _segments(plan: Plan, options, meter: Meter, scratch: Path, log) -> list:
    """The packs, or a single pack cut into layer ranges (each range's graphs written to ``scratch``)."""
    if plan.range_count > 1:
        with meter.phase("layer ranges"):
            segments = seg_plan.cut(plan.range_count, plan.source.config, plan.specs[0], plan.exported[0],
                                    plan.fused[0] if plan.fused else None, scratch,
                                    explicit=options.layer_ranges != "auto", log=log)
        release_memory()
        if segments:
            return segments
    return [seg_plan.Segment(i, spec, dict(zip(rn.GRAPH_RUNNERS, (plan.exported[i],) +
                                               ((plan.fused[i],) if plan.fused else ()))))
            for i, spec in enumerate(plan.specs)]


def _prefill(plan: Plan, options, segments, streamer, meter: Meter, log):
    """The points' inputs, and the past KV every point starts from (one prefill shared by all)."""
    longest = max(p.last for p in plan.points)
    with meter.phase("prefill"):
        # Every position any point reads (its row's tokens up to lastSum + N), and the task check's prompt.
        inputs = tokens.validation_inputs(plan.original, pts.points_batch(plan.points),
                                          max(max(p.last + p.n for p in plan.points), options.prompt_tokens),
                                          plan.dtype, plan.text)
        log(f"[validate] inputs: {inputs.describe()}")
        # Range by range: transformers' model of a few layers at a time, float32 only for the prefill.
        prefill_dtype = torch.float32 if plan.fp32_prefill else plan.dtype
        prefill = pts.Prefill(lambda layers: HFReference(plan.source, prefill_dtype, layers=layers, norm=False),
                              plan.source.config, [seg.layers for seg in segments], inputs.hidden[:, :longest],
                              plan.dtype, directory=streamer.spill_root / "prefill",
                              log=log if len(segments) > 1 else None)
        release_memory()
    log(f"[validate] prefill of {longest} tokens (shared by every point) in {meter.phases[-1].seconds:.1f} s")
    return inputs, prefill


def _through_references(plan: Plan, segments, jobs, streamer, later, meter: Meter, cut: bool, count: int, log):
    """transformers' model range by range (and, for an int4 target, its full-precision model too)."""
    profile = plan.profile
    for s_index, seg in enumerate(segments):
        with meter.phase("reference"):
            ref = HFReference(plan.source, plan.ref_dtype, layers=seg.layers, norm=seg.spec.final_norm,
                              round_to=plan.dtype)
            # int4 targets: the full-precision model too, for the quality figures (not the verdict).
            ref_fp = (quantized.full_precision_reference(plan.original, plan.ref_dtype, seg.layers,
                                                         seg.spec.final_norm, plan.dtype)
                      if plan.quant and plan.specs[seg.pack].final_norm else None)
        log(f"[validate] {seg.label(cut)}: {count} point(s) through {rn.REFERENCE}")
        contract = io_contract(plan.source.config, seg.spec, profile.export.batch_dim, profile.dtype)
        streamer.run(rn.ReferenceRunner(ref, seg.spec, contract, log=log, out_dtype=plan.dtype), jobs[s_index], later)
        if ref_fp is not None:
            streamer.run(quantized.quality_runner(ref_fp, seg.spec, contract, log, plan.dtype), jobs[s_index], set())
        del ref, ref_fp
        release_memory()


def _through_graphs(plan: Plan, segments, jobs, streamer, later, cut: bool, count: int, log):
    """ONNX Runtime on each graph runner's graphs, runner by runner: one range's weights in memory at a time."""
    for name in rn.GRAPH_RUNNERS:
        later.discard(name)
        for s_index, seg in enumerate(segments):
            if name in plan.not_run:          # no such graph, or it failed to start for an earlier pack
                break
            runner, _ = rn.make_onnxrt(seg.graphs[name], name)
            runner.kvplan_graph = seg.graphs[name]
            log(f"[validate] {seg.label(cut)}: {count} point(s) through {name}")
            streamer.run(runner, jobs[s_index], later)
            release_memory()


def _through_engines(plan: Plan, pack_jobs, streamer, log):
    """TensorRT on each pack's plan, one optimization profile's points at a time."""
    for p_index, spec in enumerate(plan.specs):
        for job in pack_jobs[p_index]:
            runner, why = rn.make_tensorrt(plan.plans[p_index] if plan.plans else None, plan.backend,
                                           plan.backend_error, job.group[0].point.profile_index, spec)
            if runner is None:
                plan.not_run.setdefault(rn.TENSORRT, why)
                continue
            log(f"[validate] {job.base}: {len(job.group)} point(s) through {rn.TENSORRT}")
            streamer.run(runner, [job], set())


def _collected(plan: Plan, pack_jobs, streamer) -> tuple[list, list[str], list[str]]:
    """The int4 quality rows, the files written and the re-check commands, from what ran."""
    quality, files, commands = [], [], []
    for p_index, spec in enumerate(plan.specs):
        for job in pack_jobs[p_index]:
            ran = set(streamer.ran.get(job.base, []))
            if plan.quant and spec.final_norm and {rn.EXPORT, quantized.QUALITY_RUNNER} <= ran:
                quality += [quantized.quality_row(d.point.label, streamer.measured[(job.base, rn.EXPORT, d.point.label)])
                            for d in job.group]
            sp_index = job.group[0].point.profile_index
            files += [str(w.relative_to(plan.target)) for w in streamer.written.get(job.base, [])]
            commands += _commands(plan.target, plan.stems[p_index], sp_index, plan.profile.shapes[sp_index].name,
                                  plan.exported[p_index], plan.fused, plan.plans, p_index, ran, plan.backend_name,
                                  plan.profile.validate, int4=bool(plan.quant))
    return quality, files, commands


def _task_phases(plan: Plan, options, segments, prompt, meter: Meter, log) -> tuple[dict, dict]:
    task = {"ran": False, "why": "--no-task"}
    if not options.no_task:
        with meter.phase("task check"):
            task = _task_checks(options, plan.source, plan.dtype, plan.specs, segments, plan.plans, plan.backend,
                                plan.backend_error, plan.profile, plan.not_run, prompt, log, ends=_task_ends(plan))
        release_memory()
    quality_task = {"ran": False, "why": "not an int4 target" if not plan.quant else "--no-task"}
    if plan.quant and not options.no_task:
        with meter.phase("quality task check"):
            quality_task = quantized.quality_task(plan.original, plan.dtype, [seg.spec for seg in segments],
                                                  [seg.graphs[rn.EXPORT] for seg in segments], options,
                                                  prompt, plan.profile.validate, log)
        release_memory()
    return task, quality_task


# --- verdict ---

@dataclass
class Verdict:
    status: str                  # pass | fail | inconclusive
    mismatch: list               # rows over tolerance
    task_bad: list[str]          # task checks that failed, in words


def _verdict(outcome: Outcome, options) -> Verdict:
    mismatch = [s for s in outcome.rows if not s.passed]
    task_bad = []
    for name, r in (outcome.task.get("stacks") or {}).items():
        if r.get("ran") and not r["passed_tolerance"]:
            task_bad.append(f"{name}: multi-step hidden_out over tolerance from step {r['first_step_over_tolerance']}")
        if r.get("ran") and r["agreement"] < options.min_agreement:
            task_bad.append(f"{name}: token agreement {100 * r['agreement']:.1f}% < {100 * options.min_agreement:.0f}%")
    task_bad += whole_step.verdict(outcome.whole_step, options.min_agreement)
    compared = {s.pair for s in outcome.rows}
    status = "fail" if mismatch or task_bad else ("pass" if compared else "inconclusive")
    return Verdict(status, mismatch, task_bad)


# --- report ---

def _report(plan: Plan, outcome: Outcome, verdict: Verdict, meter: Meter, options) -> list[str]:
    profile = plan.profile
    lines = ["", f"runners ({plan.source.name}, profile {profile.name}, {profile.dtype}):"]
    lines += [f"  {name:14s} " + ("ran" if name in outcome.ran else
                                  f"NOT RUN: {plan.not_run.get(name, 'not available')}") for name in rn.NAMES]
    lines += ["", report.table(outcome.rows, full=options.full) if outcome.rows else
              "no two runners ran: nothing was compared", ""]
    lines += report.task_summary(outcome.task) + [""]
    lines += whole_step.summary(outcome.whole_step) + [""]
    lines += report.phase_table(meter, plan.weight_bytes) + [""]
    if plan.quant:
        lines += quantized.summary(plan.quant.get("method", "int4"), outcome.quality, outcome.quality_task) + [""]
    lines += [f"Polygraphy JSON inputs/outputs: {plan.vdir}", f"re-check without kvplan or PyTorch (from {plan.target}):"]
    lines += [f"  {c}" for c in outcome.commands] + [""]
    shown = {"pass": "PASS", "fail": "FAIL", "inconclusive": "INCONCLUSIVE (nothing compared)"}[verdict.status]
    # A layer range is named by its layers (its pack index would not tell which).
    where = [seg.label(outcome.cut) for seg in outcome.segments]
    detail = [f"{s.point} {where[s.pack]} {s.pair}: {s.output}" for s in verdict.mismatch] + verdict.task_bad
    lines.append(f"validation {shown}" + (": " + "; ".join(detail[:20]) + (" ..." if len(detail) > 20 else "")
                                          if detail else ""))
    return lines


# --- record ---

def _record(plan: Plan, outcome: Outcome, verdict: Verdict, meter: Meter, manifest: dict, seconds: float, log):
    """The verdict in manifest.json, unless the target changed while it was validated."""
    tol, segments = plan.profile.validate, outcome.segments
    record = {"status": verdict.status, "finished": now(), "seconds": round(seconds, 2),
              "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "logits_atol": tol.logits_atol,
                            "rule": "|got - ref| <= atol + rtol * |ref| (logits: logits_atol)"},
              "points": outcome.labels, "inputs": outcome.inputs_record,
              "prefill_dtype": "float32" if plan.fp32_prefill else plan.profile.dtype,
              "reference_dtype": str(plan.ref_dtype).removeprefix("torch."),
              "runners": {n: ({"ran": True} if n in outcome.ran else
                              {"ran": False, "why": plan.not_run.get(n, "not available")}) for n in rn.NAMES},
              "pairs": report.worst_per_pair(outcome.rows), "task": _task_record(outcome.task),
              "whole_step": outcome.whole_step,
              "phases": [p.to_dict() for p in meter.merged()],
              "peak_rss_mib": None if meter.peak is None else round(meter.peak / 2**20, 1),
              "weight_mib": round(plan.weight_bytes / 2**20, 1),
              **({"quality": {"method": plan.quant.get("method"), "points": outcome.quality,
                              "task": _task_record(outcome.quality_task)}} if plan.quant else {}),
              "files": outcome.files, "recheck": outcome.commands,
              **({"layer_ranges": [f"{s.spec.first_layer}..{s.spec.last_layer - 1}" for s in segments]}
                 if outcome.cut else {}),
              "artifacts": {str(p.relative_to(plan.target)): sha256_file(p) for p in plan.hashed}}
    current = load_manifest(plan.target)
    if current is None or current.get("stages") != manifest.get("stages"):
        log("warning: manifest changed during validation; validation record not written")
        return
    current["validation"] = record
    write_json_atomic(plan.target / MANIFEST, current)


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


def _task_ends(plan: Plan):
    """The target's embedding and head graphs for the task check, where ONNX Runtime runs them and the
    head is in the profile dtype (an int4 head would be measured against the checkpoint's own head,
    which the reference uses: a quality figure, not the check's)."""
    record = plan.manifest["stages"].get("embed_head")
    paths = perplexity.full_logit_head(record)
    heads = [a for a in (record or {}).get("artifacts", []) if a.get("graph") == "head"]
    if paths is None or plan.dtype == torch.bfloat16 or any(a.get("int4_group") for a in heads):
        return None
    return perplexity.GraphEnds(*(plan.target / p for p in paths))


def _task_checks(options, source, dtype, specs, segments, plans, backend, backend_error, profile, not_run, prompt,
                 log, ends=None):
    """``ends``: the target's embedding and head graphs (perplexity.GraphEnds), which then pick the
    stacks' tokens in place of the checkpoint's own."""
    stacks: dict = {}
    for name in rn.GRAPH_RUNNERS:
        if name not in segments[0].graphs:
            continue
        if name in not_run:
            stacks[name] = not_run[name]
            continue
        # 64 small steps per graph: the default level (int4 weights fused into MatMulNBits, fp16
        # casts folded once); at the basic level an int4 graph dequantizes every weight every step.
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
        if profile.export.kv_io == "inplace":
            # The prompt and every generated token but the last must fit the buffer.
            steps = max(1, min(steps, profile.export.cache_len - options.prompt_tokens + 1))
            if steps < options.steps:
                log(f"[validate] task check: {steps} steps, not {options.steps}: the in-place buffer has "
                    f"{profile.export.cache_len} rows and the prompt {options.prompt_tokens} tokens")
        return run_task_checks(source, dtype, stacks, steps, prompt, profile.validate, log, ends=ends)


def _task_record(task: dict) -> dict:
    """The manifest keeps the summary, not 64 per-step numbers per stack."""
    out = {k: v for k, v in task.items() if k != "stacks"}
    if "stacks" in task:
        out["stacks"] = {n: {k: v for k, v in r.items() if k != "hidden_max_abs_per_step"}
                         for n, r in task["stacks"].items()}
    return out


