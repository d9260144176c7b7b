"""Regenerate every kvplan benchmark table.

    python -m bench.run                      # all sections, results in bench/results/<date>.{json,md} + latest.md
    python -m bench.run --quick              # smoke run (tiny-llama, few reps) into bench/results/quick/
    python -m bench.run --sections peers,graph --no-wait

Sections: pipeline (wall time and peak RSS per stage), peers (kvplan vs Optimum vs ONNX Runtime
GenAI's builder on one checkpoint), graph (ONNX Runtime CPU latency of every graph), engine
(TensorRT-RTX unfused vs fused), scale (export peak RSS / weight bytes on a >1.8 GB model).
A results file of the same date is merged: re-running one section replaces only that section.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import shutil
import sys
import time
from pathlib import Path

from .common import (
    GENAI_ML_DTYPES,
    GENAI_VENV,
    PEERS_VENV,
    ROOT,
    dir_bytes,
    loadavg,
    log,
    machine_info,
    measure,
    mib,
    onnx_stats,
    wait_for_quiet,
)

SECTIONS = ("pipeline", "peers", "graph", "engine", "scale")
PY = sys.executable
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}


def fresh(d: Path) -> Path:
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


def manifest(out: Path, model: str, profile: str) -> dict:
    p = out / model / profile / "manifest.json"
    return json.loads(p.read_text()) if p.exists() else {}


def engines_cmd(profile, model, out, *extra):
    return [PY, "-m", "build.engines", "--profile", profile, "--model", model, "--out", str(out), *extra]


# ----------------------------------------------------------------------------------------------- pipeline
def section_pipeline(ctx) -> dict:
    targets = [("tiny-llama", "fp16")] if ctx.quick else [
        ("minicpmo26-tts", "fp16"), ("minicpmo26-tts", "fp32"), ("qwen2-0.5b-shape", "fp16")]
    rows = []
    for model, profile in targets:
        out = fresh(ctx.work / "pipeline" / f"{model}-{profile}")
        logs = ctx.work / "logs" / "pipeline" / f"{model}-{profile}"
        row = {"model": model, "profile": profile, "out": str(out), "stages": {}, "one_run_stage_seconds": {}}
        for stage, extra in (("export", ["--stop-after", "export"]), ("surgery", ["--stop-after", "surgery"]),
                             ("engines", [])):
            row["stages"][stage] = measure(engines_cmd(profile, model, out, *extra), log_file=logs / f"{stage}.log")
        # What a user runs: every stage in one command, into a fresh target; twice, for the
        # run-to-run spread (the export caches nothing between builds); and once with every stage
        # in the one process (--one-process) instead of a forked child per stage group.
        for label, extra in (("all stages, one command", ()), ("all stages, one command, again", ()),
                             ("all stages, --one-process", ("--one-process",))):
            whole = fresh(ctx.work / "pipeline" / f"{model}-{profile}-whole")
            row["stages"][label] = measure(engines_cmd(profile, model, whole, *extra), log_file=logs / f"{label}.log")
            row["one_run_stage_seconds"][label] = round(sum(
                r.get("seconds") or 0 for r in manifest(whole, model, profile).get("stages", {}).values()
                if isinstance(r, dict)), 2) or None
            shutil.rmtree(whole, ignore_errors=True)
        vcmd = [PY, "-m", "build.validate", "--profile", profile, "--model", model, "--out", str(out)]
        # build.validate's defaults (every point, token and multi-step checks) take many minutes per target on
        # 2 cores: they run for the first target only; the others get --validate-args (recorded in the row).
        vextra = [] if (ctx.quick or not rows) else ctx.validate_args.split()
        vcmd += vextra
        row["validate_args"] = " ".join(vextra) or "(defaults)"
        if (ROOT / "build" / "validate.py").exists():
            row["stages"]["validate"] = measure(vcmd, log_file=logs / "validate.log", timeout=ctx.validate_timeout)
        else:
            row["stages"]["validate"] = {"skipped": "build/validate.py does not exist"}
        m = manifest(out, model, profile)
        st = m.get("stages", {})
        row["weight_bytes"] = st.get("export", {}).get("weight_bytes")
        row["manifest"] = {s: {"seconds": r.get("seconds"), "process_peak_rss_mib": r.get("process_peak_rss_mib")}
                           for s, r in st.items() if isinstance(r, dict)}
        row["artifact_bytes"] = {a["path"]: a.get("bytes") for r in st.values() if isinstance(r, dict)
                                 for a in r.get("artifacts", [])}
        if "validation" in m:
            row["validation_verdict"] = {k: m["validation"].get(k) for k in ("verdict", "status", "passed")
                                         if k in m["validation"]}
        rows.append(row)
    return {"rows": rows}


def md_pipeline(sec) -> list[str]:
    out = ["## Pipeline: wall time and peak RSS per stage", "",
           "Each stage is a separate `python -m build.engines` process (`--stop-after export`, then `--stop-after "
           "surgery`, then the full run; later runs find earlier stages up to date), then `python -m build.validate`; "
           "*all stages* rows run every stage in one command into a fresh target (*again*: repeated; *--one-process*: "
           "without the forked child per stage group); "
           "peak RSS via `getrusage(RUSAGE_CHILDREN)` in a fresh helper per process (the largest single process: a "
           "build runs its stage groups in forked children), and the highest sum of RSS over the whole process tree "
           "sampled every 20 ms (the parent beside its child; shared pages twice); *peak / weights* takes the larger. "
           "Random (preset) weights. "
           "Wall time includes interpreter start-up and imports; *stage s* is the stage's own time from the manifest.",
           "",
           "| model | profile | stage | wall s | stage s | peak RSS MiB | tree RSS MiB | peak / weights | rc "
           "| load before → after |",
           "|---|---|---|---:|---:|---:|---:|---:|---|---|"]
    for r in sec["rows"]:
        wb = r.get("weight_bytes")
        for stage, s in r["stages"].items():
            if "skipped" in s:
                out.append(f"| {r['model']} | {r['profile']} | {stage} | — | — | — | — | — | skipped: {s['skipped']} | |")
                continue
            ms = r.get("manifest", {}).get(stage, {}).get("seconds")
            if stage in r.get("one_run_stage_seconds", {}):
                ms = r["one_run_stage_seconds"][stage]
            peak = max(s.get("peak_rss_mib") or 0, s.get("peak_tree_rss_mib") or 0)
            ratio = f"{peak * 2**20 / wb:.2f}×" if wb and peak else "—"
            label = f"validate {r.get('validate_args', '')}" if stage == "validate" else stage
            out.append(f"| {r['model']} | {r['profile']} | {label} | {s.get('wall_s')} | {ms if ms is not None else '—'} "
                       f"| {s.get('peak_rss_mib')} | {s.get('peak_tree_rss_mib') or '—'} | {ratio} | {s.get('rc')} "
                       f"| {s['load_before'][0]} → {s['load_after'][0]} |")
    out.append("")
    out.append("Weight bytes (manifest `stages.export.weight_bytes`): " + ", ".join(
        f"{r['model']}/{r['profile']} {mib(r.get('weight_bytes'))} MiB" for r in sec["rows"]))
    out.append("")
    out.append("Validation verdicts (manifest): " + ", ".join(
        f"{r['model']}/{r['profile']} {(r.get('validation_verdict') or {}).get('status', '—')}" for r in sec["rows"]))
    for r in sec["rows"]:
        for stage, s in r["stages"].items():
            if s.get("rc") not in (0, None):
                out += ["", f"`{r['model']}/{r['profile']}` {stage} exited {s.get('rc')}:", "", "```",
                        s.get("tail", "")[-800:], "```"]
    return out


# ----------------------------------------------------------------------------------------------- peers
def peer_row(name, res, out_dir, graph, notes=""):
    row = {"peer": name, "run": res, "out_dir": str(out_dir), "notes": notes}
    if res.get("rc") == 0 and graph and Path(graph).exists():
        row["graph"] = str(graph)
        row["output_bytes"] = dir_bytes(out_dir) if out_dir else Path(graph).stat().st_size
        row["stats"] = onnx_stats(Path(graph))
    return row


def section_peers(ctx) -> dict:
    work = ctx.work / "peers"
    ckpt = work / "ckpt"
    preset = "tiny-llama" if ctx.quick else "minicpmo26-tts"
    fresh(work)
    ck = measure([PY, "-m", "bench.checkpoint", str(ckpt), "--preset", preset, "--dtype", "float16"],
                 log_file=ctx.work / "logs" / "peers" / "checkpoint.log", keep_output=True)
    ck_out = ck.pop("_output", "")
    info = (json.loads([ln for ln in ck_out.splitlines() if ln.startswith("{")][-1]) if ck.get("rc") == 0
            else {"error": ck.get("tail")})
    rows = []
    logs = ctx.work / "logs" / "peers"
    for prof in ("fp32", "fp16"):
        out = work / f"kvplan-{prof}"
        res = measure(engines_cmd(prof, str(ckpt), out, "--stop-after", "embed_head"), log_file=logs / f"kvplan-{prof}.log")
        tgt = out / ckpt.name / prof
        m = manifest(out, ckpt.name, prof).get("stages", {})
        note = (f"export {m.get('export', {}).get('seconds')} s + surgery {m.get('surgery', {}).get('seconds')} s + "
                f"embedding and head {m.get('embed_head', {}).get('seconds')} s (manifest); the decoder graph, and "
                f"embed.onnx and head.onnx beside it (token ids in, logits out, as the peers)")
        rows.append(peer_row(f"kvplan export ({prof})", res, None, tgt / "decoder.onnx", note))
        rows[-1]["output_bytes"] = (tgt / "decoder.onnx").stat().st_size if (tgt / "decoder.onnx").exists() else None
        if res.get("rc") == 0:
            from kvplan import profiles
            passes = ",".join(profiles.load(prof).surgery.passes)
            rows.append({"peer": f"kvplan fused {passes} ({prof})", "run": {"rc": 0}, "graph": str(tgt / "decoder.fused.onnx"),
                         "output_bytes": (tgt / "decoder.fused.onnx").stat().st_size,
                         "stats": onnx_stats(tgt / "decoder.fused.onnx"), "notes": "surgery stage output (the profile's passes)"})
            # The other variant, with or without the attention pass, for comparison.
            other = "rmsnorm,rope" if "attention" in passes else "rmsnorm,rope,attention"
            alt = tgt / "decoder.alt.onnx"
            r2 = measure([PY, "-m", "surgery", str(tgt / "decoder.onnx"), "-o", str(alt), "--passes", other],
                         log_file=logs / f"kvplan-alt-{prof}.log")
            rows.append(peer_row(f"kvplan fused {other} ({prof})", r2, None, alt,
                                 f"`python -m surgery decoder.onnx --passes {other}`"))
            if "output_bytes" in rows[-1]:
                rows[-1]["output_bytes"] = alt.stat().st_size
            # The same export again, into a fresh target: the run-to-run spread, and the bytes must not change.
            again = work / f"kvplan-{prof}-again"
            r3 = measure(engines_cmd(prof, str(ckpt), again, "--stop-after", "embed_head"),
                         log_file=logs / f"kvplan-{prof}-again.log")
            m3 = manifest(again, ckpt.name, prof).get("stages", {})
            graph = again / ckpt.name / prof / "decoder.onnx"
            same = r3.get("rc") == 0 and filecmp.cmp(graph, tgt / "decoder.onnx", shallow=False)
            # No graph of its own for the latency section: it is the same file as the cold export's, or says not.
            rows.append(peer_row(f"kvplan export ({prof}), again", r3, None, None,
                                 f"export {m3.get('export', {}).get('seconds')} s + surgery "
                                 f"{m3.get('surgery', {}).get('seconds')} s (manifest); the run above repeated into a "
                                 f"fresh target; decoder.onnx "
                                 f"{'byte-identical to' if same else 'DIFFERS from'} the cold export's"))
            rows[-1]["output_bytes"] = graph.stat().st_size if r3.get("rc") == 0 else None
            rows[-1]["identical_to_first"] = same
    # Optimum (optimum-onnx): fp32 on CPU; fp16 export requires a CUDA device, so it is attempted to record why.
    if (PEERS_VENV / "bin" / "optimum-cli").exists():
        for dtype in ("fp32", "fp16"):
            out = work / f"optimum-{dtype}"
            cmd = [str(PEERS_VENV / "bin" / "optimum-cli"), "export", "onnx", "--model", str(ckpt), "--task",
                   "text-generation-with-past"] + (["--dtype", "fp16", "--device", "cpu"] if dtype == "fp16" else []) + [str(out)]
            res = measure(cmd, env=OFFLINE, log_file=logs / f"optimum-{dtype}.log", timeout=1200)
            rows.append(peer_row(f"Optimum optimum-cli ({dtype})", res, out, out / "model.onnx",
                                 "includes embedding + LM head (token ids in, logits out); torch.onnx TorchScript "
                                 "exporter on transformers' LlamaForCausalLM"))
    else:
        rows.append({"peer": "Optimum optimum-cli", "run": {"rc": "not installed"},
                     "notes": f"no {PEERS_VENV}/bin/optimum-cli: run bench/setup_peers.sh"})
    if (GENAI_VENV / "bin" / "python").exists():
        def genai(out, dtype):
            return [str(GENAI_VENV / "bin" / "python"), "-m", "onnxruntime_genai.models.builder", "-i", str(ckpt),
                    "-o", str(out), "-p", dtype, "-e", "cpu", "-c", str(work / "genai-cache")]
        for dtype in ("fp32", "fp16"):
            out = work / f"genai-{dtype}"
            res = measure(genai(out, dtype), env=OFFLINE, log_file=logs / f"genai-{dtype}.log", timeout=1200)
            rows.append(peer_row(f"ORT GenAI builder ({dtype}, -e cpu)", res, out, out / "model.onnx",
                                 "includes embedding + LM head (token ids in, logits out)"))
        if (GENAI_ML_DTYPES / "ml_dtypes").is_dir():
            # The same fp16 run with ml_dtypes 0.6.0 ahead of the venv's 0.7.0: what kvplan's cap saves it.
            out = work / "genai-fp16-ml_dtypes-0.6"
            env = {**OFFLINE, "PYTHONPATH": os.pathsep.join([str(GENAI_ML_DTYPES), str(ROOT)])}
            res = measure(genai(out, "fp16"), env=env, log_file=logs / "genai-fp16-ml_dtypes-0.6.log", timeout=1200)
            rows.append(peer_row("ORT GenAI builder (fp16, -e cpu), ml_dtypes 0.6.0", res, out, out / "model.onnx",
                                 f"the row above with {GENAI_ML_DTYPES} (ml_dtypes 0.6.0 only) on PYTHONPATH, as "
                                 f"kvplan's ml_dtypes<0.7"))
    else:
        rows.append({"peer": "ORT GenAI builder", "run": {"rc": "not installed"},
                     "notes": f"no {GENAI_VENV}: run bench/setup_peers.sh"})
    shutil.rmtree(work / "genai-cache", ignore_errors=True)
    return {"checkpoint": info, "checkpoint_run": ck, "rows": rows}


def peer_ratios(rows: list[dict]) -> list[str]:
    """kvplan's cold export (+ surgery + embedding/head) over GenAI's builder, per dtype."""
    wall = {r["peer"]: r.get("run", {}).get("wall_s") for r in rows if r.get("run", {}).get("rc") == 0}
    found = []
    for dtype in ("fp32", "fp16"):
        ours = wall.get(f"kvplan export ({dtype})")
        for peer, label in ((f"ORT GenAI builder ({dtype}, -e cpu)", "as installed"),
                            (f"ORT GenAI builder ({dtype}, -e cpu), ml_dtypes 0.6.0", "GenAI with ml_dtypes 0.6.0")):
            if ours and wall.get(peer):
                found.append(f"{dtype} {ours} / {wall[peer]} s = {ours / wall[peer]:.2f}× ({label})")
    return found


def md_peers(sec) -> list[str]:
    ck = sec.get("checkpoint", {})
    out = ["## Peers: export of one Llama checkpoint", "",
           f"Checkpoint written by `bench/checkpoint.py`: shape `{ck.get('preset_shape')}` as LlamaForCausalLM, "
           f"{ck.get('parameters')} parameters incl. embedding and LM head, {ck.get('dtype')} safetensors "
           f"({mib(ck.get('bytes'))} MiB), tiny offline word-level tokenizer. Peer venvs: see machine info.", "",
           "| exporter | rc | wall s | peak RSS MiB | output MiB | nodes | top ops | notes |",
           "|---|---|---:|---:|---:|---:|---|---|"]
    for r in sec["rows"]:
        run = r.get("run", {})
        st = r.get("stats", {})
        ops = ", ".join(f"{k} {v}" for k, v in list(st.get("ops", {}).items())[:8]) if st else ""
        out.append(f"| {r['peer']} | {run.get('rc')} | {run.get('wall_s', '—')} | {run.get('peak_rss_mib', '—')} | "
                   f"{mib(r.get('output_bytes'))} | {st.get('nodes', '—')} | {ops} | {r.get('notes', '')} |")
    ratios = peer_ratios(sec["rows"])
    if ratios:
        out += ["", "kvplan's wall time over GenAI's builder's, same run: " + "; ".join(ratios) + "."]
    fails = [r for r in sec["rows"] if r.get("run", {}).get("rc") not in (0,)]
    for r in fails:
        out += ["", f"**{r['peer']}** did not produce a graph (rc {r['run'].get('rc')}):", "", "```",
                (r["run"].get("tail") or r.get("notes", ""))[-1000:], "```"]
    return out


# ----------------------------------------------------------------------------------------------- graph
def section_graph(ctx, peers_sec) -> dict:
    if not peers_sec:
        return {"skipped": "needs the peers section's graphs (run with --sections peers,graph)"}
    rows = []
    reps = (["--decode-reps", "3", "--prefill-reps", "1", "--warmup", "1"] if ctx.quick
            else ["--decode-reps", "20", "--prefill-reps", "5", "--warmup", "2"])
    points = "decode:302,decode:2048,prefill:303"
    for r in peers_sec["rows"]:
        g = r.get("graph")
        if not g or r.get("run", {}).get("rc") != 0:
            continue
        cfg = (peers_sec.get("checkpoint") or {}).get("config", {})
        extra = ["--vocab", str(cfg.get("vocab_size", 32000)), "--head-dim", str(cfg.get("head_dim", 64))]
        res = measure([PY, "-m", "bench.ort_latency", g, "--threads", "2", "--points", points, *reps, *extra],
                      log_file=ctx.work / "logs" / "graph" / (Path(g).parent.name + "-" + Path(g).stem + ".log"),
                      timeout=900, keep_output=True)
        lat_out = res.pop("_output", "")
        row = {"graph": r["peer"], "path": g, "nodes": r.get("stats", {}).get("nodes"),
               "token_ids_in": "input_ids" in r.get("stats", {}).get("inputs", []), "run": res}
        try:
            row["latency"] = json.loads([ln for ln in lat_out.splitlines() if ln.startswith("{")][-1])
        except (IndexError, json.JSONDecodeError):
            row["latency"] = None
        rows.append(row)
    return {"threads": 2, "points": points, "reps": reps, "rows": rows}


def _lat(row, point):
    lat = (row.get("latency") or {}).get("points", {}).get(point)
    if not lat:
        return "failed" if row.get("run", {}).get("rc") != 0 else "—"
    return "error" if "error" in lat else f"{lat['median_ms']:.1f}"


def md_graph(sec) -> list[str]:
    if "skipped" in sec:
        return ["## Graph quality", "", f"skipped: {sec['skipped']}"]
    out = ["## Graph quality: ONNX Runtime CPU latency (ms, median)", "",
           f"onnxruntime CPU EP, intra_op_num_threads=2, ORT_ENABLE_ALL; `bench/ort_latency.py`, inputs mapped by "
           f"role with the same seeded values; runs {' '.join(sec['reps'])}. decode = one token (N=1) with a past of "
           "lastSum; prefill = 303 tokens, empty past. Peers take token ids and include the embedding gather and the "
           "vocab×hidden LM head (32000×768 = 24.6 M MACs per token for the default shape; kvplan's graph is the "
           "decoder stack only).", "",
           "| graph | nodes | embed + LM head | load s | decode @302 | decode @2048 | prefill 303 |",
           "|---|---:|---|---:|---:|---:|---:|"]
    for r in sec["rows"]:
        lat = r.get("latency") or {}
        out.append(f"| {r['graph']} | {r.get('nodes')} | {'yes' if r.get('token_ids_in') else 'no'} | "
                   f"{lat.get('load_s', '—')} | {_lat(r, 'decode:302')} | {_lat(r, 'decode:2048')} | {_lat(r, 'prefill:303')} |")
    for r in sec["rows"]:
        for p, v in ((r.get("latency") or {}).get("points", {})).items():
            if "error" in v:
                out += ["", f"{r['graph']} {p}: `{v['error'][:400]}`"]
        if r.get("run", {}).get("rc") != 0:
            out += ["", f"{r['graph']}: rc {r['run'].get('rc')}", "```", r["run"].get("tail", "")[-600:], "```"]
    return out


# ----------------------------------------------------------------------------------------------- engine
def section_engine(ctx, pipe_sec) -> dict:
    model = "tiny-llama" if ctx.quick else "minicpmo26-tts"
    rows = []
    from kvplan import profiles
    fused = f"fused ({', '.join(profiles.load('fp16').surgery.passes)})"
    for variant, extra in (("unfused (--no-surgery)", ["--no-surgery"]), (fused, [])):
        out = fresh(ctx.work / "engine" / variant.split()[0])
        pre = measure(engines_cmd("fp16", model, out, "--stop-after", "export"),
                      log_file=ctx.work / "logs" / "engine" / f"{variant.split()[0]}-export.log")
        if "--no-surgery" not in extra:
            measure(engines_cmd("fp16", model, out, "--stop-after", "surgery"),
                    log_file=ctx.work / "logs" / "engine" / f"{variant.split()[0]}-surgery.log")
        res = measure(engines_cmd("fp16", model, out, *extra),
                      log_file=ctx.work / "logs" / "engine" / f"{variant.split()[0]}-engines.log")
        m = manifest(out, model, "fp16").get("stages", {}).get("engines", {})
        b = (m.get("artifacts") or [{}])[0].get("build", {})
        mem = b.get("memory", {})
        rows.append({"variant": variant, "model": model, "export_rc": pre.get("rc"), "run": res,
                     "build_seconds": b.get("build_seconds"), "plan_bytes": b.get("plan_bytes"),
                     "builder_reported": mem.get("builder_reported"), "weights_bytes_onnx": mem.get("weights_bytes_onnx"),
                     "layers": b.get("network", {}).get("layers"),
                     "layer_types": b.get("network", {}).get("layer_types"),
                     "backend": f"{b.get('backend')} {b.get('backend_version')}"})
    return {"rows": rows}


def md_engine(sec) -> list[str]:
    out = ["## Engine: TensorRT-RTX build, unfused vs fused (fp16)", "",
           "Full `python -m build.engines --profile fp16` run after `--stop-after export`/`surgery` (so wall time and RSS "
           "are the engines stage's); activation/weights memory as the builder reports it (manifest "
           "`stages.engines.artifacts[0].build.memory.builder_reported`).", "",
           "| model | variant | backend | rc | build s | stage wall s | stage peak RSS MiB | plan MiB | network layers | "
           "activation MiB prefill / decode | weights MiB (builder) |",
           "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in sec["rows"]:
        br = r.get("builder_reported") or {}
        pp = br.get("per_profile", {})
        act = " / ".join(mib(pp.get(k, {}).get("total_activation_memory_bytes")) for k in ("prefill", "decode"))
        run = r["run"]
        out.append(f"| {r['model']} | {r['variant']} | {r['backend']} | {run.get('rc')} | {r.get('build_seconds')} | "
                   f"{run.get('wall_s')} | {run.get('peak_rss_mib')} | {mib(r.get('plan_bytes'))} | {r.get('layers')} | "
                   f"{act} | {mib(br.get('total_weights_memory_bytes'))} |")
    for r in sec["rows"]:
        if r["run"].get("rc") != 0:
            out += ["", f"{r['variant']}: rc {r['run'].get('rc')}", "```", r["run"].get("tail", "")[-800:], "```"]
    return out


# ----------------------------------------------------------------------------------------------- scale
def section_scale(ctx) -> dict:
    from .preset_run import EXTRA_PRESETS, decoder_params
    shapes = ["tiny-llama"] if ctx.quick else ctx.scale_shapes
    rows = []
    mem_total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    last_ratio = None
    for name in shapes:
        cfg = EXTRA_PRESETS.get(name)
        est = decoder_params(cfg) * 2 if cfg else None
        if est and last_ratio and est * last_ratio > 0.85 * mem_total:
            rows.append({"shape": name, "skipped": f"predicted peak {est * last_ratio / 2**30:.1f} GiB "
                                                   f"(weights {est / 2**30:.2f} GiB × {last_ratio:.2f}) does not fit "
                                                   f"{mem_total / 2**30:.1f} GiB"})
            continue
        out = fresh(ctx.work / "scale" / name)
        args = engines_cmd("fp16", name, out, "--stop-after", "export")[3:]
        cmd = [PY, "-m", "bench.preset_run", name, "--"] + args if cfg else [PY, "-m", "build.engines"] + args
        res = measure(cmd, log_file=ctx.work / "logs" / "scale" / f"{name}.log", timeout=1800)
        m = manifest(out, name, "fp16").get("stages", {}).get("export", {})
        wb = m.get("weight_bytes")
        tgt = out / name / "fp16"
        files = {p.name: p.stat().st_size for p in tgt.glob("decoder.onnx*")} if tgt.exists() else {}
        ratio = res["peak_rss_mib"] * 2**20 / wb if wb and res.get("peak_rss_mib") else None
        rows.append({"shape": name, "config": cfg.to_dict() if cfg else None, "run": res, "weight_bytes": wb,
                     "manifest_seconds": m.get("seconds"), "manifest_peak_rss_mib": m.get("process_peak_rss_mib"),
                     "files": files, "external_data": any(k.endswith(".data") for k in files),
                     "rss_over_weights": round(ratio, 2) if ratio else None})
        last_ratio = ratio or last_ratio
        shutil.rmtree(out, ignore_errors=True)  # GBs
    return {"rows": rows}


def md_scale(sec) -> list[str]:
    out = ["## Scale: export peak RSS vs weight bytes (fp16, external data)", "",
           "`--stop-after export` in a subprocess that registers the shape into `kvplan.models.presets.PRESETS` "
           "(`bench/preset_run.py`; random weights). Peak RSS via getrusage in a fresh helper.", "",
           "| shape | rc | wall s | weights MiB | peak RSS MiB | RSS / weights | external data | files |",
           "|---|---|---:|---:|---:|---:|---|---|"]
    for r in sec["rows"]:
        if "skipped" in r:
            out.append(f"| {r['shape']} | skipped | | | | | | {r['skipped']} |")
            continue
        run = r["run"]
        files = ", ".join(f"{k} {mib(v)} MiB" for k, v in r.get("files", {}).items())
        out.append(f"| {r['shape']} | {run.get('rc')} | {run.get('wall_s')} | {mib(r.get('weight_bytes'))} | "
                   f"{run.get('peak_rss_mib')} | {r.get('rss_over_weights')}× | {r.get('external_data')} | {files} |")
        if run.get("rc") != 0:
            out += ["", "```", run.get("tail", "")[-800:], "```"]
    return out


# ----------------------------------------------------------------------------------------------- main
def render(results: dict) -> str:
    mi = results["machine"]
    lines = [f"# kvplan benchmarks — {results['date']}{' (quick)' if results.get('quick') else ''}", "",
             f"Machine: {mi.get('cpu_model')}, {mi.get('cores')} cores, {mi.get('ram_gib')} GiB RAM, "
             f"{mi.get('platform')}, Python {mi.get('python')}; load average at start {mi.get('load_average_at_start')}; "
             f"kvplan {str(mi.get('kvplan_commit'))[:10]}{' (work tree dirty)' if mi.get('kvplan_worktree_dirty') else ''}.",
             "", "Libraries: " + ", ".join(f"{k} {v}" for k, v in mi.get("libraries", {}).items() if v), ""]
    for venv, libs in mi.get("peer_venv_libraries", {}).items():
        lines.append(f"Peer venv `{venv}`: " + ", ".join(f"{k} {v}" for k, v in libs.items() if v))
    lines.append("")
    for name, gate in results.get("gates", {}).items():
        lines.append(f"- {name}: load {gate['load_before_wait']} → {gate['load_after_wait']} after waiting "
                     f"{gate['waited_s']} s (threshold {gate['threshold']}; quiet: {gate['quiet']})")
    lines.append("")
    render_fns = {"pipeline": md_pipeline, "peers": md_peers, "graph": md_graph, "engine": md_engine, "scale": md_scale}
    for s in SECTIONS:
        if s in results["sections"]:
            lines += render_fns[s](results["sections"][s]) + [""]
            if "seconds" in results["sections"][s]:
                lines += [f"_section took {results['sections'][s]['seconds']} s_", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny-llama, few repetitions, results in bench/results/quick/")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma list of {', '.join(SECTIONS)}")
    p.add_argument("--work", type=Path, default=Path("/tmp/kvplan-bench"), help="scratch dir (wiped per target)")
    p.add_argument("--results", type=Path, default=None, help="results dir (default bench/results, or bench/results/quick)")
    p.add_argument("--no-wait", action="store_true", help="do not wait for a quiet machine before each section")
    p.add_argument("--load-threshold", type=float, default=0.8)
    p.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for the load threshold per section")
    p.add_argument("--validate-args", default="--points opt --no-task",
                   help="extra build.validate arguments for every pipeline target after the first (default: %(default)s)")
    p.add_argument("--validate-timeout", type=float, default=1200)
    p.add_argument("--scale-shapes", default="llama3.2-1b-shape",
                   help="extra shapes from bench/preset_run.py, smallest first (llama3.2-3b-shape is skipped when the "
                        "previous ratio predicts it will not fit)")
    p.add_argument("--date", default=time.strftime("%Y-%m-%d"))
    ctx = p.parse_args(argv)
    ctx.scale_shapes = ctx.scale_shapes.split(",")
    chosen = [s.strip() for s in ctx.sections.split(",") if s.strip()]
    bad = [s for s in chosen if s not in SECTIONS]
    if bad:
        p.error(f"unknown section(s) {bad}; choose from {SECTIONS}")
    results_dir = ctx.results or (ROOT / "bench" / "results" / ("quick" if ctx.quick else ""))
    results_dir.mkdir(parents=True, exist_ok=True)
    ctx.work.mkdir(parents=True, exist_ok=True)
    jpath = results_dir / f"{ctx.date}.json"
    results = json.loads(jpath.read_text()) if jpath.exists() else {"sections": {}, "gates": {}}
    results.update({"date": ctx.date, "quick": ctx.quick, "machine": machine_info()})
    results.setdefault("gates", {})
    for i, s in enumerate(chosen):
        if not ctx.no_wait:  # the full wait before the first section, a short one between sections
            results["gates"][s] = wait_for_quiet(ctx.load_threshold, ctx.max_wait if i == 0 else min(ctx.max_wait, 60))
        log(f"section {s}")
        t0 = time.monotonic()
        if s == "pipeline":
            sec = section_pipeline(ctx)
        elif s == "peers":
            sec = section_peers(ctx)
        elif s == "graph":
            sec = section_graph(ctx, results["sections"].get("peers"))
        elif s == "engine":
            sec = section_engine(ctx, results["sections"].get("pipeline"))
        else:
            sec = section_scale(ctx)
        sec["seconds"] = round(time.monotonic() - t0, 1)
        sec["load_after"] = loadavg()
        results["sections"][s] = sec
        jpath.write_text(json.dumps(results, indent=1, default=str))  # after every section: partial results survive
        md = render(results)
        (results_dir / f"{ctx.date}.md").write_text(md)
        (results_dir / "latest.md").write_text(md)
    print(render(results))
    log(f"wrote {jpath} and {results_dir / (ctx.date + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
