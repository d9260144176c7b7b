"""Validation stage: Polygraphy comparisons, stale targets, saved JSON, task-level checks.

Targets are built once per module through the pipeline CLI with a small profile
(N [1, 4, 8], lastSum [0, 8, 16]) so the whole file stays within a few minutes.

How a numeric failure is provoked: the model source is a Hugging Face directory
written here; a copy of it (same directory name, so the same target) gets one
weight tensor perturbed *in place*, keeping the file's size and mtime. The
source fingerprint (size, mtime, config hash) is unchanged, so the target is
still current, while transformers now reads different weights than the ONNX
graphs were exported from: exactly the "graph no longer matches the model"
situation validation exists to catch, and it must name the tensors that differ.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
from safetensors.torch import save_file

from kvplan.cli import build_main as engines_main
from kvplan.cli import validate_main
from kvplan.manifest import load_manifest, sha256_file
from kvplan.models import resolve
from kvplan.models.families import hf_config_dict as to_hf_dict
from kvplan.models.presets import tensor_shapes
from kvplan.profiles import load as load_profile
from kvplan.validate.compare import compare_arrays
from kvplan.validate.points import parse_kinds, reserve_slots, select_points

PROFILE = """description = "validation test profile"
[export]
dtype = "{dtype}"
decoder_pack_size = {pack}
kv_format = {kv_format}
kv_io = "{kv_io}"
[surgery]
passes = {passes}
[engine]
[[engine.shapes]]
name = "prefill"
N = [1, 4, 8]
lastSum = [0, 8, 16]
[[engine.shapes]]
name = "decode"
N = [1, 1, 1]
lastSum = [1, 8, 16]
[validate]
atol = {atol}
rtol = {rtol}
"""
TOL = {"float32": (1e-4, 1e-4), "float16": (5e-2, 2e-2), "bfloat16": (2e-1, 8e-2)}


def write_profile(directory: Path, name: str, dtype: str, pack: int = 0, kv_format: int = 0,
                  passes: str = '["rmsnorm", "rope"]', kv_io: str = "concat") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    atol, rtol = TOL[dtype]
    path.write_text(PROFILE.format(dtype=dtype, pack=pack, kv_format=kv_format, kv_io=kv_io, passes=passes,
                                   atol=atol, rtol=rtol))
    return path


def write_hf_checkpoint(directory: Path, preset: str = "tiny-llama") -> None:
    """tiny-llama's weights (with embeddings and LM head) as a one-shard Hugging Face checkpoint."""
    source = resolve(preset)
    tensors = {f"model.{k}": v.contiguous() for k, v in source.read_tensors(list(tensor_shapes(source.config))).items()}
    lm = source.read_lm()
    tensors["model.embed_tokens.weight"] = lm["embed_tokens.weight"].contiguous()
    tensors["lm_head.weight"] = lm["lm_head.weight"].contiguous()
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(to_hf_dict(source.config)))
    save_file(tensors, directory / "model.safetensors")


def perturb_in_place(shard: Path, tensor: str, delta: float) -> None:
    """Add ``delta`` to a float32 tensor inside a safetensors file, keeping its size and mtime."""
    st = shard.stat()
    with open(shard, "r+b") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(header_len))
        begin, end = header[tensor]["data_offsets"]
        f.seek(8 + header_len + begin)
        values = np.frombuffer(f.read(end - begin), np.float32) + np.float32(delta)
        f.seek(8 + header_len + begin)
        f.write(values.astype(np.float32).tobytes())
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))


def snapshot(target: Path) -> dict:
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in target.iterdir()
            if p.is_file() and p.suffix in (".onnx", ".plan", ".data")}


def polygraphy_cmd(command: str) -> list[str]:
    """A printed ``polygraphy run ...`` command, run with this interpreter's Polygraphy."""
    parts = shlex.split(command)
    parts = [p for p in parts if "=" not in p or p.startswith("--")]     # drop env assignments
    assert parts[0] == "polygraphy"
    # Polygraphy has no ``python -m polygraphy``: run its console script with this interpreter.
    script = Path(sys.executable).parent / "polygraphy"
    if not script.exists():
        found = shutil.which("polygraphy")
        if found is None:
            pytest.skip("the polygraphy command-line tool is not installed")
        script = Path(found)
    return [sys.executable, str(script), *parts[1:]]


@pytest.fixture(scope="module")
def hf_target(tmp_path_factory):
    """An fp32 target built from a Hugging Face directory, through every stage including the engine."""
    root = tmp_path_factory.mktemp("validate-hf")
    model = root / "models" / "tiny-hf"
    write_hf_checkpoint(model)
    profile = write_profile(root / "profiles", "vfp32", "float32")
    out = root / "engines"
    assert engines_main(["--model", str(model), "--profile", str(profile), "--out", str(out)]) == 0
    return {"root": root, "model": model, "profile": profile, "out": out, "target": out / "tiny-hf" / "vfp32"}


def _args(t: dict, *extra: str, model: Path | None = None) -> list[str]:
    return ["--model", str(model or t["model"]), "--profile", str(t["profile"]), "--out", str(t["out"]), *extra]


def test_fp32_passes_reports_tensorrt_not_run_and_records_the_manifest(hf_target, capsys):
    from kvplan.trt.backend import select_backend
    before = load_manifest(hf_target["target"])
    rc = validate_main(_args(hf_target, "--points", "min,opt,masked"))
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "validation PASS" in out
    for pair in ("pytorch vs onnxrt-export", "pytorch vs onnxrt-fused", "onnxrt-export vs onnxrt-fused"):
        assert pair in out
    assert "prefill/min N=1 lastSum=0" in out and "prefill/masked" in out
    record = load_manifest(hf_target["target"])
    validation = record["validation"]
    assert validation["status"] == "pass"
    assert validation["runners"]["pytorch"]["ran"] and validation["runners"]["onnxrt-fused"]["ran"]
    assert validation["pairs"]["pytorch vs onnxrt-fused"]["passed"]
    assert validation["pairs"]["pytorch vs onnxrt-fused"]["max_abs"] < 1e-4
    if not select_backend("tensorrt-rtx").can_run:
        assert not validation["runners"]["tensorrt"]["ran"]
        assert "no CUDA GPU visible" in validation["runners"]["tensorrt"]["why"]
        assert "tensorrt       NOT RUN" in out and "no CUDA GPU visible" in out
    # The build's own fields are untouched.
    assert record["stages"] == before["stages"] and record["status"] == before["status"] == "complete"

    # Task-level checks ran in the same call: fp32 agrees on every token.
    task = validation["task"]
    assert task["ran"] and task["steps"] == 64
    for name in ("onnxrt-export", "onnxrt-fused"):
        r = task["stacks"][name]
        assert r["ran"] and r["agreement"] == 1.0 and r["first_divergence"] is None, r
        assert r["passed_tolerance"] and r["drift"]["max"] < 1e-4
    assert "token agreement 100.0%" in out


def test_saved_polygraphy_json_rechecks_with_the_polygraphy_cli(hf_target):
    target = hf_target["target"]
    if "validation" not in (load_manifest(target) or {}):
        assert validate_main(_args(hf_target, "--points", "opt", "--no-task")) == 0
    commands = load_manifest(target)["validation"]["recheck"]
    onnxrt = [c for c in commands if "--onnxrt" in c]
    assert onnxrt and any("--trt" in c and "decoder.plan" in c for c in commands)
    for command in onnxrt:
        assert "decoder.fused.onnx" in command and "outputs.pytorch.json" in command
        done = subprocess.run(polygraphy_cmd(command), cwd=target, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "PASSED" in done.stdout + done.stderr


def test_corrupted_weights_fail_and_name_the_tensor(hf_target, tmp_path, capsys):
    corrupt = tmp_path / "tiny-hf"              # same directory name: the same target
    shutil.copytree(hf_target["model"], corrupt)  # copy2 keeps mtimes: the fingerprint still matches
    perturb_in_place(corrupt / "model.safetensors", "model.layers.2.self_attn.v_proj.weight", 0.05)
    before = snapshot(hf_target["target"])
    rc = validate_main(_args(hf_target, "--points", "opt", "--no-task", model=corrupt))
    out = capsys.readouterr().out
    assert rc == 1, out
    assert "validation FAIL" in out
    failing = out[out.index("failing tensors"):]
    # Layer 2's V projection changes past_value2 and everything downstream of it, not layers 0-1.
    assert "pytorch vs onnxrt-fused" in failing and "past_value2" in failing and "hidden_out" in failing
    assert "past_key0" not in failing and "past_value1" not in failing
    record = load_manifest(hf_target["target"])["validation"]
    assert record["status"] == "fail"
    assert any("past_value2" in t for t in record["pairs"]["pytorch vs onnxrt-export"]["failing_tensors"])
    assert record["pairs"]["onnxrt-export vs onnxrt-fused"]["passed"]
    assert snapshot(hf_target["target"]) == before          # nothing rebuilt


def test_stale_targets_are_reported_and_never_rebuilt(hf_target, tmp_path, capsys):
    target = hf_target["target"]
    before, manifest_before = snapshot(target), (target / "manifest.json").read_bytes()
    # Same profile name (so the same target directory), another dtype.
    other = write_profile(tmp_path / "profiles", "vfp32", "float16")
    rc = validate_main(["--model", str(hf_target["model"]), "--profile", str(other), "--out", str(hf_target["out"])])
    err = capsys.readouterr().err
    assert rc == 2 and "stale" in err and "export" in err
    # The model directory changed (a shard rewritten: new mtime).
    changed = tmp_path / "tiny-hf"
    shutil.copytree(hf_target["model"], changed)
    os.utime(changed / "model.safetensors", ns=(1, 1))
    rc = validate_main(_args(hf_target, model=changed))
    err = capsys.readouterr().err
    assert rc == 2 and "stale" in err
    assert snapshot(target) == before and (target / "manifest.json").read_bytes() == manifest_before


def test_nothing_built_is_an_error(tmp_path, capsys):
    profile = write_profile(tmp_path, "nothing", "float32")
    assert validate_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(tmp_path / "e")]) == 2
    assert "nothing built" in capsys.readouterr().err


@pytest.mark.slow  # two packs through the whole CLI; packs stay covered by test_layer_ranges and test_pipeline
def test_fp16_packs_kv_format_1_through_the_pipeline_cli(tmp_path, capsys):
    """build.engines --validate: fp16, two packs of two layers (each pack fed the reference's hidden state)."""
    profile = write_profile(tmp_path, "vfp16", "float16", pack=2, kv_format=1)
    rc = engines_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(tmp_path / "e"),
                       "--stop-after", "surgery", "--validate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    validation = load_manifest(tmp_path / "e" / "tiny-llama" / "vfp16")["validation"]
    assert validation["status"] == "pass"
    assert "no engine in this target" in validation["runners"]["tensorrt"]["why"]
    assert "decoder.pack1.fused.onnx" in " ".join(validation["recheck"])
    # Each pack was compared on its own inputs, and its files saved for re-checks.
    assert {"validation/decoder.pack0.prefill.inputs.json", "validation/decoder.pack1.decode.inputs.json",
            "validation/decoder.pack1.prefill.outputs.pytorch.json"} <= set(validation["files"])
    assert all(p["passed"] for p in validation["pairs"].values())
    assert validation["task"]["stacks"]["onnxrt-fused"]["agreement"] >= 0.95


def validate_kv_io(tmp_path, capsys, kv_io: str) -> tuple[dict, str]:
    """Export, fuse and validate tiny-llama (float32) with ``kv_io``; the validation record and the output."""
    profile = write_profile(tmp_path, f"v{kv_io}", "float32", kv_io=kv_io)
    rc = engines_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(tmp_path / "e"),
                       "--stop-after", "surgery", "--validate"])
    out = capsys.readouterr().out
    assert rc == 0, out
    return load_manifest(tmp_path / "e" / "tiny-llama" / f"v{kv_io}")["validation"], out


def test_delta_kv_io_is_validated_on_the_new_rows_and_over_many_steps(tmp_path, capsys):
    """kv_io = "delta": each point compares present_* with the reference's new rows, and the
    multi-step check appends them to the host-side cache step after step."""
    validation, out = validate_kv_io(tmp_path, capsys, "delta")
    assert validation["status"] == "pass"
    # The table names each row's worst tensor: delta outputs, present_*, and never past_*.
    assert "present_" in out and "past_key0" not in out
    assert validation["task"]["stacks"]["onnxrt-fused"]["agreement"] == 1.0


def test_inplace_kv_io_is_validated_on_the_whole_buffer_and_over_many_steps(tmp_path, capsys):
    """kv_io = "inplace": each point feeds a buffer whose rows past lastSum + N hold stale data;
    the reference writes its rows into the same buffer, so every output row is compared (the
    untouched ones included), and the multi-step check carries the buffer step after step."""
    validation, out = validate_kv_io(tmp_path, capsys, "inplace")
    assert validation["status"] == "pass"
    assert all(p["passed"] for p in validation["pairs"].values())
    # The buffer (24 rows, the profile's largest step) bounds the steps: 8 prompt tokens + 16.
    assert validation["task"]["steps"] == 17 and "task check: 17 steps, not 64" in out
    assert validation["task"]["stacks"]["onnxrt-fused"]["agreement"] == 1.0


@pytest.mark.parametrize("version, refused", [("0.49.26", True), ("0.50.2", True), ("0.50.3", False),
                                               ("0.53.6", False)])
def test_tensorrt_runner_runs_in_place_graphs_where_polygraphy_binds_aliased_outputs(tmp_path, version, refused):
    """Polygraphy binds an aliased output to its input's buffer from 0.50.3 on; before, the runner
    is not made for in-place graphs, and says why. Past the gate the usual reasons apply (here: no
    backend)."""
    from kvplan.decoder import pack_specs
    from kvplan.validate.runners import make_tensorrt
    [spec] = pack_specs(resolve("tiny-llama").config, 0, 0, "inplace", 64)
    runner, why = make_tensorrt(tmp_path / "decoder.plan", None, "no backend here", 0, spec, polygraphy_version=version)
    assert runner is None
    assert ("Polygraphy binds from 0.50.3 on" in why) if refused else why == "no backend here"


def test_bfloat16_reports_what_onnx_runtime_cannot_run(tmp_path, capsys):
    profile = write_profile(tmp_path, "vbf16", "bfloat16", passes="[]")
    assert engines_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(tmp_path / "e"),
                         "--stop-after", "export"]) == 0
    capsys.readouterr()
    rc = validate_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(tmp_path / "e"),
                        "--points", "opt"])
    out = capsys.readouterr().out
    assert rc == 3, out                         # nothing could be compared on this host: not a pass
    assert "onnxrt-export  NOT RUN: ONNX Runtime" in out and "NOT_IMPLEMENTED" in out
    assert "INCONCLUSIVE" in out
    record = load_manifest(tmp_path / "e" / "tiny-llama" / "vbf16")["validation"]
    assert record["status"] == "inconclusive" and not record["runners"]["onnxrt-export"]["ran"]


# ----------------------------------------------------------------- units (no build)

def test_points_cover_min_opt_max_lastsum_zero_and_masked_slots(tmp_path):
    profile = load_profile(str(write_profile(tmp_path, "p", "float32")))
    points = select_points(profile, parse_kinds("all"))
    got = {(p.profile, p.kind, p.n, p.last) for p in points}
    assert ("prefill", "min", 1, 0) in got and ("prefill", "max", 8, 16) in got
    assert ("decode", "opt", 1, 8) in got and ("prefill", "masked", 4, 8) in got
    assert [p.kind for p in select_points(profile, parse_kinds("opt"))] == ["opt", "opt"]
    with pytest.raises(ValueError, match="unknown point kind"):
        parse_kinds("middle")
    mask = reserve_slots(torch.zeros(1, 1, 4, 12), 8)
    assert (mask[0, 0, :, 2:4] == torch.finfo(torch.float32).min).all() and (mask[0, 0, :, 4:] == 0).all()


def test_comparison_uses_atol_plus_rtol_and_names_the_worst_element():
    want = np.array([[1.0, 100.0], [0.0, -2.0]], np.float32)
    ok = compare_arrays(want, want + np.array([[0.0, 0.9], [0.05, 0.0]], np.float32), 0.1, 0.01,
                        point="p", pack=0, pair="a vs b", output="x")
    assert ok.passed                              # 0.9 <= 0.1 + 0.01 * 100 ; 0.05 <= 0.1
    bad = compare_arrays(want, want + np.array([[0.0, 0.0], [0.0, 0.2]], np.float32), 0.1, 0.01,
                         point="p", pack=0, pair="a vs b", output="x")
    assert not bad.passed and bad.worst_index == (1, 1) and bad.max_abs == pytest.approx(0.2)
    nan = compare_arrays(want, np.full_like(want, np.nan), 1.0, 1.0, point="p", pack=0, pair="a vs b", output="x")
    assert not nan.passed


def _whole_tensor_comparison(want, got, atol, rtol):
    """The comparison's definition, over the whole tensor at once."""
    want, got = want.astype(np.float32), got.astype(np.float32)
    err = np.abs(got - want)
    excess = err - (atol + rtol * np.abs(want))
    excess[np.isnan(excess)] = np.inf
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(excess), want.shape))
    return worst, float(np.nanmax(err)), float(np.nanmean(err)), not np.isnan(err).any() and excess.max() <= 0


@pytest.mark.parametrize("case", ["new rows differ", "all differ", "a NaN mid-tensor", "over the bound", "float32 vs float16"])
def test_the_comparison_block_by_block_is_the_comparison_of_the_whole_tensor(case):
    rng = np.random.default_rng(1)
    want = rng.standard_normal((1, 3, 4096, 16)).astype(np.float16)     # six blocks
    got = want.copy()
    got[:, :, 3584:] += (0.003 * rng.standard_normal((1, 3, 512, 16))).astype(np.float16)
    if case == "all differ":
        got = (want + 0.01 * rng.standard_normal(want.shape)).astype(np.float16)
    elif case == "a NaN mid-tensor":
        got[0, 1, 100, 3] = np.nan
    elif case == "over the bound":
        got[0, 2, 4000, 7] += 1.0
    elif case == "float32 vs float16":
        want = want.astype(np.float32)
    stats = compare_arrays(want, got, 0.05, 0.02, point="p", pack=0, pair="a vs b", output="x")
    worst, max_abs, mean_abs, passed = _whole_tensor_comparison(want, got, 0.05, 0.02)
    assert (stats.worst_index, stats.passed) == (worst, passed)
    assert stats.max_abs == max_abs and stats.mean_abs == pytest.approx(mean_abs, rel=1e-5)


# ------------------------------------------------- wrong graphs must fail (tiny models)

@pytest.fixture(scope="module")
def fused_target(tmp_path_factory):
    """tiny-llama, float32, exported and fused (no engine): the graphs the wrong-graph tests corrupt."""
    root = tmp_path_factory.mktemp("validate-wrong")
    profile = write_profile(root / "profiles", "vwrong", "float32")
    out = root / "engines"
    assert engines_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(out),
                         "--stop-after", "surgery"]) == 0
    return {"profile": profile, "out": out}


def copy_with_fused_graph_edited(out: Path, target: Path, tmp_path: Path, edit, drop_engines: bool = False) -> Path:
    """A copy of the build tree ``out`` whose ``target``'s fused graph ``edit`` changed, recorded in
    the manifest as if the surgery stage had written it (a pass with a bug); returns the copy's root.
    ``drop_engines``: the plans (built from the unedited graph) are removed with their record."""
    copy = tmp_path / "engines"
    shutil.copytree(out, copy)
    target = copy / target.relative_to(out)
    path = target / "decoder.fused.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))
    manifest = json.loads((target / "manifest.json").read_text())
    for entry in manifest["stages"]["surgery"]["artifacts"]:
        if entry["path"] == path.name:
            entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    if drop_engines:
        for entry in manifest["stages"].pop("engines")["artifacts"]:
            (target / entry["path"]).unlink(missing_ok=True)
    manifest.pop("validation", None)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return copy


def swap_key_caches(model) -> None:
    """An edit: the graph computes what it did, but its past_key0 output carries layer 1's keys and back."""
    names = {"past_key0": "past_key1", "past_key1": "past_key0"}
    for node in model.graph.node:
        node.output[:] = [names.get(n, n) for n in node.output]
        node.input[:] = [names.get(n, n) for n in node.input]


def rewrite_graph(fused_target, tmp_path, edit) -> list[str]:
    """Validation args for a copy of the target whose fused graph ``edit`` changed."""
    out = fused_target["out"]
    copy = copy_with_fused_graph_edited(out, out / "tiny-llama" / "vwrong", tmp_path, edit)
    return ["--model", "tiny-llama", "--profile", str(fused_target["profile"]), "--out", str(copy),
            "--points", "opt", "--no-task"]


def test_a_perturbed_weight_in_the_fused_graph_fails_against_the_reference_and_the_exported_graph(
        fused_target, tmp_path, capsys):
    def perturb(model):
        [init] = [t for t in model.graph.initializer if t.name == "layers.2.post_attention_layernorm.weight"]
        values = onnx.numpy_helper.to_array(init) + np.float32(0.05)
        init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))

    rc = validate_main(rewrite_graph(fused_target, tmp_path, perturb))
    out = capsys.readouterr().out
    assert rc == 1, out
    failing = out[out.index("failing tensors"):]
    # Layer 2's MLP input changes what leaves layer 2: hidden_out and layer 3's cache, not layers 0-2's.
    assert "hidden_out" in failing and "past_key3" in failing
    assert not any(f"past_{kind}{i} " in failing for kind in ("key", "value") for i in range(3))
    record = load_manifest(tmp_path / "engines" / "tiny-llama" / "vwrong")["validation"]
    assert record["pairs"]["pytorch vs onnxrt-export"]["passed"]
    assert not record["pairs"]["pytorch vs onnxrt-fused"]["passed"]


def test_a_swapped_cache_tensor_in_the_fused_graph_fails_and_names_both_tensors(fused_target, tmp_path, capsys):
    rc = validate_main(rewrite_graph(fused_target, tmp_path, swap_key_caches))
    out = capsys.readouterr().out
    assert rc == 1, out
    record = load_manifest(tmp_path / "engines" / "tiny-llama" / "vwrong")["validation"]
    failing = record["pairs"]["pytorch vs onnxrt-fused"]["failing_tensors"]
    assert any(t.endswith(" past_key0") for t in failing) and any(t.endswith(" past_key1") for t in failing)
    assert not any("hidden_out" in t or "past_value" in t for t in failing)
    assert record["pairs"]["pytorch vs onnxrt-export"]["passed"]


def test_the_report_gives_each_phase_its_time_and_peak_memory(fused_target, tmp_path, capsys):
    out = tmp_path / "engines"
    shutil.copytree(fused_target["out"], out)
    rc = validate_main(["--model", "tiny-llama", "--profile", str(fused_target["profile"]), "--out", str(out),
                        "--points", "opt", "--steps", "4"])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert "time and memory per phase" in text
    record = load_manifest(out / "tiny-llama" / "vwrong")["validation"]
    names = [p["name"] for p in record["phases"]]
    assert names == ["prefill", "reference", "pytorch", "onnxrt-export", "onnxrt-fused", "task check", "whole step"]
    if sys.platform == "linux":
        assert all(p["peak_rss_mib"] > 0 for p in record["phases"])
        assert record["peak_rss_mib"] >= max(p["peak_rss_mib"] for p in record["phases"])
    # Nothing of the spill directory is left behind.
    assert not [p for p in (out / "tiny-llama" / "vwrong" / "validation").iterdir() if p.name.startswith(".")]
