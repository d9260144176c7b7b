"""Dynamic batch: ``export.batch = [min, opt, max]`` makes the graphs' batch axis ``B``.

The graphs take any batch in the range, every TensorRT optimization profile carries it, and
validation checks a batch of rows of different lengths against transformers run on each
row's own past alone. A static batch (the default, 1) keeps today's graphs byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper
import onnxruntime as ort
import pytest
import torch

from kvplan import profiles
from kvplan.cli import build_main as engines_main
from kvplan.cli import validate_main
from kvplan.decoder import pack_specs
from kvplan.errors import ProfileError
from kvplan.export.exporter import example_inputs, input_names, io_contract
from kvplan.manifest import load_manifest, sha256_file
from kvplan.models import resolve
from kvplan.trt.shapes import shapes_for
from kvplan.validate.points import parse_kinds, select_points

ROOT = Path(__file__).resolve().parent.parent

PROFILE = """description = "dynamic batch test profile"
[export]
dtype = "float32"
{batch}
kv_io = "{kv_io}"
[surgery]
passes = ["rmsnorm", "rope", "attention"]
[engine]
optimization_level = 0
[[engine.shapes]]
name = "prefill"
N = [1, 4, 8]
lastSum = [0, 8, 16]
[[engine.shapes]]
name = "decode"
N = [1, 1, 1]
lastSum = [1, 8, 16]
[validate]
atol = 1e-4
rtol = 1e-4
"""


def write_profile(directory: Path, name: str, batch: str = "batch = [1, 2, 4]", kv_io: str = "concat") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}.toml"
    path.write_text(PROFILE.format(batch=batch, kv_io=kv_io))
    return path


# The in-place variants export a second graph (~15 s on this machine): slow, like the default
# model's byte-identity check; the concat ones stay in the default run.
KV_IO = ["concat", pytest.param("inplace", marks=pytest.mark.slow)]


def dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


# ----------------------------------------------------------------- profile field

def test_batch_range_is_read_as_a_dynamic_axis(tmp_path):
    profile = profiles.load(str(write_profile(tmp_path, "b")))
    assert profile.export.batch == profiles.Range(1, 2, 4)
    assert profile.export.batch_dim == "B" and profile.export.batch_range == profiles.Range(1, 2, 4)


def test_batch_stays_a_static_one_by_default(tmp_path):
    for profile in (profiles.load("fp16"), profiles.load(str(write_profile(tmp_path, "s", batch="")))):
        export = profile.export
        assert export.batch == 1 and export.batch_dim == 1 and export.batch_range == profiles.Range(1, 1, 1)


@pytest.mark.parametrize("value, message", [
    ("[0, 1, 2]", "min 0 must be >= 1"),
    ("[2, 1, 4]", "must satisfy min <= opt <= max"),
    ("[1, 2]", "must be [min, opt, max] integers"),
    ("[1, 2.5, 4]", "must be [min, opt, max] integers"),
    ('"two"', "must be an integer or [min, opt, max], got 'two'"),
    ("0", "must be >= 1"),
    ("true", "must be an integer or [min, opt, max], got True"),
])
def test_bad_batch_is_refused_naming_file_and_field(tmp_path, value, message):
    path = write_profile(tmp_path, "bad", batch=f"batch = {value}")
    with pytest.raises(ProfileError) as e:
        profiles.load(str(path))
    assert str(e.value).startswith(f"{path}: export.batch: ") and message in str(e.value)


def test_shapes_override_B_gives_a_shipped_profile_a_batch_range(tmp_path):
    from kvplan.target import resolve_target
    _, profile, _ = resolve_target("tiny-llama", "fp32", tmp_path, ("B=1,2,4", "decode:lastSum=1,8,64"))
    assert profile.export.batch == profiles.Range(1, 2, 4) and profile.export.batch_dim == "B"
    assert "batch 1 -> [1, 2, 4] (--shapes)" in profile.adjusted
    assert {s.name: s for s in profile.shapes}["decode"].lastSum == profiles.Range(1, 8, 64)


@pytest.mark.parametrize("text, message", [("B=0,1,2", "--shapes: B: min 0 must be >= 1"),
                                           ("B=1,x,4", "--shapes: B: must be min,opt,max integers, got '1,x,4'"),
                                           ("B=4,2,1", "--shapes: B: must satisfy min <= opt <= max")])
def test_a_bad_B_override_is_refused_like_the_toml(text, message):
    with pytest.raises(ProfileError, match=message.replace("[", r"\[")):
        profiles.with_shapes(profiles.load("fp32"), [text])


# ----------------------------------------------------------------- shapes (no build)

def test_every_optimization_profile_gets_the_batch_range_on_every_input(tmp_path):
    profile = profiles.load(str(write_profile(tmp_path, "b", kv_io="inplace")))
    cfg = resolve("tiny-llama").config
    [spec] = pack_specs(cfg, 0, 0, "inplace", profile.export.cache_len)
    shapes = shapes_for(io_contract(cfg, spec, profile.export.batch_dim, profile.dtype), profile)
    assert list(shapes) == ["prefill", "decode"]
    for per_input in shapes.values():
        assert "write_indices" in per_input
        for name, (lo, opt, hi) in per_input.items():
            assert (lo[0], opt[0], hi[0]) == (1, 2, 4), name


def test_points_at_the_smallest_batch_and_a_batch_point_of_rows_of_different_lengths(tmp_path):
    profile = profiles.load(str(write_profile(tmp_path, "b")))
    points = select_points(profile, parse_kinds("all"))
    batched = [p for p in points if p.kind == "batch"]
    assert [(p.profile, p.batch, p.n, p.last, p.rows) for p in batched] == [
        ("prefill", 2, 4, 8, (8, 4)), ("decode", 2, 1, 8, (8, 4))]
    assert all(p.batch == 1 and not p.rows for p in points if p.kind != "batch")
    # A static batch has no batch point.
    static = profiles.load(str(write_profile(tmp_path, "s", batch="")))
    assert not [p for p in select_points(static, parse_kinds("all")) if p.kind == "batch"]


# ----------------------------------------------------------------- graphs

@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    """targets(kv_io) -> tiny-llama float32 with batch = [1, 2, 4], exported and fused (no engine)."""
    made = {}

    def get(kv_io: str) -> dict:
        if kv_io not in made:
            root = tmp_path_factory.mktemp(f"batch-{kv_io}")
            profile = write_profile(root / "profiles", f"b{kv_io}", kv_io=kv_io)
            out = root / "engines"
            assert engines_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(out),
                                 "--stop-after", "surgery"]) == 0
            target = out / "tiny-llama" / f"b{kv_io}"
            made[kv_io] = {"profile": profile, "out": out, "target": target,
                           "onnx": target / "decoder.onnx", "fused": target / "decoder.fused.onnx",
                           "manifest": load_manifest(target)}
        return made[kv_io]

    return get


@pytest.mark.parametrize("kv_io", KV_IO)
def test_every_batch_axis_of_the_graphs_is_B(targets, kv_io):
    t = targets(kv_io)
    for path in (t["onnx"], t["fused"]):
        graph = onnx.load(str(path)).graph
        assert {v.name: dims(v)[0] for v in [*graph.input, *graph.output]} == \
            {v.name: "B" for v in [*graph.input, *graph.output]}
    io = t["manifest"]["stages"]["export"]["artifacts"][0]["io"]
    assert all(info["shape"][0] == "B" for part in ("inputs", "outputs") for info in io[part].values())


@pytest.mark.parametrize("kv_io", KV_IO)
def test_attention_is_fused_in_every_layer_with_a_dynamic_batch(targets, kv_io):
    passes = targets(kv_io)["manifest"]["stages"]["surgery"]["artifacts"][0]["report"]["passes"]
    layers = resolve("tiny-llama").config.num_layers
    assert passes["attention"] == {"fused": layers, "near_misses": []}
    assert passes["rope"]["fused"] == 2 * layers and passes["rmsnorm"]["fused"] == 2 * layers + 1


@pytest.mark.parametrize("kv_io", KV_IO)
@pytest.mark.parametrize("graph", ["onnx", "fused"])
def test_onnx_runtime_runs_batch_1_and_3_with_each_row_as_its_own_batch_1_run(targets, kv_io, graph):
    t = targets(kv_io)
    cfg = resolve("tiny-llama").config
    profile = profiles.load(str(t["profile"]))
    [spec] = pack_specs(cfg, 0, 0, kv_io, profile.export.cache_len)
    session = ort.InferenceSession(str(t[graph]), providers=["CPUExecutionProvider"])
    feed = {n: v.numpy() for n, v in zip(input_names(spec), example_inputs(cfg, spec, 3, torch.float32, 4, 6, seed=3))}
    whole = session.run(None, feed)
    assert whole[0].shape == (3, 4, cfg.hidden_size)
    for b in range(3):
        alone = session.run(None, {k: v[b:b + 1] for k, v in feed.items()})
        for name, got, want in zip([o.name for o in session.get_outputs()], whole, alone):
            np.testing.assert_allclose(got[b:b + 1], want, atol=1e-6, rtol=1e-6, err_msg=name)


# ----------------------------------------------------------------- validation

def rewrite_fused(t: dict, tmp_path: Path, edit) -> list[str]:
    """A copy of the target whose fused graph ``edit`` changed (recorded as if surgery wrote it):
    validation arguments for the copy."""
    out = tmp_path / "engines"
    shutil.copytree(t["out"], out)
    target = out / t["target"].relative_to(t["out"])
    path = target / "decoder.fused.onnx"
    model = onnx.load(str(path))
    edit(model.graph)
    onnx.save(model, str(path))
    manifest = json.loads((target / "manifest.json").read_text())
    for entry in manifest["stages"]["surgery"]["artifacts"]:
        if entry["path"] == path.name:
            entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return validate_args(t, out)


def validate_args(t: dict, out: Path | None = None) -> list[str]:
    return ["--model", "tiny-llama", "--profile", str(t["profile"]), "--out", str(out or t["out"]),
            "--points", "opt,batch", "--no-task"]


def reroute(graph, name: str, nodes: list, output: str) -> None:
    """Every consumer of graph input ``name`` reads ``output`` instead, computed by ``nodes``."""
    for node in graph.node:
        node.input[:] = [output if i == name else i for i in node.input]
    kept = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + kept)


def row0_for_every_row(graph, name: str) -> None:
    """Every row of graph input ``name`` replaced by row 0's (shape kept: a batch-broadcast bug)."""
    graph.initializer.extend([onnx.helper.make_tensor(n, onnx.TensorProto.INT64, [1], [v]) for n, v in
                              (("bug_zero", 0), ("bug_one", 1))])
    reroute(graph, name, [
        onnx.helper.make_node("Slice", [name, "bug_zero", "bug_one", "bug_zero"], ["bug_first"]),
        onnx.helper.make_node("Shape", [name], ["bug_shape"]),
        onnx.helper.make_node("Expand", ["bug_first", "bug_shape"], ["bug_rows"])], "bug_rows")


def row0_mask_for_every_row(graph) -> None:
    """A graph that masks every row as row 0 (row 1 attends to the past rows it does not have)."""
    row0_for_every_row(graph, "attention_mask")


def row0_write_index_for_every_row(graph) -> None:
    """An in-place graph that writes every row's new rows where row 0's go."""
    row0_for_every_row(graph, "write_indices")


@pytest.mark.parametrize("kv_io", KV_IO)
def test_a_batch_of_rows_of_different_lengths_passes_validation(targets, kv_io, capsys):
    t = targets(kv_io)
    rc = validate_main(validate_args(t))
    out = capsys.readouterr().out
    assert rc == 0, out
    record = load_manifest(t["target"])["validation"]
    assert record["status"] == "pass"
    assert "prefill/opt N=4 lastSum=8" in record["points"]                       # batch 1
    assert "prefill/batch N=4 lastSum=8 B=2 rows=8,4" in record["points"]        # batch 2, rows 8 and 4 long
    assert "decode/batch N=1 lastSum=8 B=2 rows=8,4" in record["points"]
    assert {"pytorch vs onnxrt-export", "pytorch vs onnxrt-fused"} <= set(record["pairs"])
    # The Polygraphy files re-check without kvplan (batch 1 and batch 2 feeds in one file).
    inputs = json.loads((t["target"] / "validation" / "decoder.prefill.inputs.json").read_text())
    assert len(inputs) == 2


@pytest.mark.slow
def test_a_batch_point_passes_in_delta_mode_over_two_packs_in_kv_format_1(tmp_path, capsys):
    """The second pack's hidden_in comes from transformers run row by row on each row's own past."""
    profile = write_profile(tmp_path / "profiles", "bdelta", kv_io="delta",
                            batch="batch = [1, 2, 4]\ndecoder_pack_size = 2\nkv_format = 1")
    out = tmp_path / "engines"
    assert engines_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(out),
                         "--stop-after", "surgery"]) == 0
    rc = validate_main(validate_args({"profile": profile}, out))
    text = capsys.readouterr().out
    assert rc == 0, text
    record = load_manifest(out / "tiny-llama" / "bdelta")["validation"]
    assert "decode/batch N=1 lastSum=8 B=2 rows=8,4" in record["points"]
    assert "validation/decoder.pack1.decode.inputs.json" in record["files"]


@pytest.mark.slow
def test_the_saved_batch_point_rechecks_with_the_polygraphy_cli(targets):
    """The printed re-check command, batch-2 feed included, passes without kvplan (slow: the
    Polygraphy CLI starts in ~10 s)."""
    t = targets("concat")
    assert validate_main(validate_args(t)) == 0
    [command] = [c for c in load_manifest(t["target"])["validation"]["recheck"]
                 if "--onnxrt" in c and "decoder.prefill." in c]
    parts = shlex.split(command)
    script = Path(sys.executable).parent / "polygraphy"
    if not script.exists():
        pytest.skip("the polygraphy command-line tool is not installed")
    done = subprocess.run([sys.executable, str(script), *parts[1:]], cwd=t["target"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "PASSED" in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]


@pytest.mark.parametrize("kv_io, bug", [("concat", row0_mask_for_every_row),
                                        pytest.param("inplace", row0_write_index_for_every_row,
                                                     marks=pytest.mark.slow)])
def test_a_graph_that_mixes_rows_fails_only_the_batch_point(targets, tmp_path, capsys, kv_io, bug):
    t = targets(kv_io)
    rc = validate_main(rewrite_fused(t, tmp_path, bug))
    out = capsys.readouterr().out
    assert rc == 1, out
    record = load_manifest(tmp_path / "engines" / t["target"].relative_to(t["out"]))["validation"]
    failing = record["pairs"]["pytorch vs onnxrt-fused"]["failing_tensors"]
    assert failing and all("/batch " in f for f in failing)
    assert any(f.endswith(" hidden_out") for f in failing), failing
    assert record["pairs"]["pytorch vs onnxrt-export"]["passed"]


# ----------------------------------------------------------------- TensorRT

def build_dynamic_engine(targets, backend, directory: Path) -> tuple[dict, dict, Path]:
    """The concat target's fused graph built at optimization level 0: (record, contract, plan)."""
    import kvplan.trt as build_trt  # tensorrt: the engine path only
    t = targets("concat")
    profile = profiles.load(str(t["profile"]))
    cfg = resolve("tiny-llama").config
    [spec] = pack_specs(cfg, 0, 0)
    contract = io_contract(cfg, spec, profile.export.batch_dim, profile.dtype)
    onnx_path = directory / "decoder.fused.onnx"
    shutil.copy(t["fused"], onnx_path)
    record = build_trt.build_engine(onnx_path, directory / "decoder.plan", profile, contract, backend, None,
                                    log=lambda *_: None)
    return record, contract, directory / "decoder.plan"


def test_engine_optimization_profiles_carry_the_batch_range(targets, backend, tmp_path):
    """A real TensorRT-RTX build of the dynamic graph: the shapes read back from each of its
    optimization profiles have B = (1, 2, 4) on every input."""
    record, contract, plan = build_dynamic_engine(targets, backend, tmp_path)
    assert plan.stat().st_size == record["plan_bytes"] > 0
    assert list(record["profiles"]) == ["prefill", "decode"]
    for per_input in record["profiles"].values():
        assert set(per_input) == set(contract["inputs"])
        for name, shapes in per_input.items():
            assert [shapes[k][0] for k in ("min", "opt", "max")] == [1, 2, 4], name
    assert record["network"]["inputs"]["hidden_in"]["shape"] == [-1, -1, 64]
    assert "--maxShapes=hidden_in:4x8x64," in record["trtexec"]


@pytest.mark.gpu
def test_the_engine_itself_holds_the_batch_range_and_runs_at_batch_2(targets, backend, tmp_path):
    """On a GPU: the deserialized engine's profile shapes (get_tensor_profile_shape) carry B = (1, 2, 4)
    on every input, and it matches ONNX Runtime at every profile's opt shapes (B = 2)."""
    if not backend.can_run:
        pytest.skip(f"needs a CUDA GPU the backend can run engines on: {backend.why_not_run}")
    import kvplan.trt as build_trt  # tensorrt: the engine path only
    from kvplan.trt.callbacks import Pending, make_logger
    from kvplan.trt.plan_io import deserialize
    record, contract, plan = build_dynamic_engine(targets, backend, tmp_path)
    trt = backend.module
    _runtime, engine = deserialize(trt, make_logger(trt, lambda msg: None, Pending()), plan.read_bytes(), "")
    assert engine.num_optimization_profiles == 2
    for k in range(2):
        for name in contract["inputs"]:
            lo, opt, hi = engine.get_tensor_profile_shape(name, k)
            assert (lo[0], opt[0], hi[0]) == (1, 2, 4), (k, name)
    profile = profiles.load(str(targets("concat")["profile"]))
    rec = build_trt.run_engine_check(plan, profile, contract, tmp_path / "decoder.fused.onnx", backend)
    assert rec["ran"] and rec["ok"], json.dumps(rec["profiles"], indent=1)


# ----------------------------------------------------------------- static batch

# Recorded when the exporter began writing the graph op by op instead of tracing it (its outputs
# on the default model were checked bit-identical to the traced graphs' in ONNX Runtime, unfused
# and fused); they change only when the graphs do.
DEFAULT_HASHES = {"decoder.onnx": "7e2c2e5253a7745fc22db667119e12500731801684fa094db7aab98a0329b08e",
                  "decoder.fused.onnx": "55932e1a6e22e2863d756700b81a13a14ba852d82b2375eefcad16cc259bff97"}


def test_a_static_batch_graph_keeps_integer_batch_axes(export_tiny):
    [pack] = export_tiny("tiny-llama")
    graph = onnx.load(str(pack.path)).graph
    assert all(dims(v)[0] == 1 for v in [*graph.input, *graph.output])


@pytest.mark.slow
def test_the_default_model_graphs_are_byte_identical_with_static_batch(tmp_path):
    """The default model at fp16 (batch = 1) exports and fuses to the recorded bytes: a change of
    batch handling (or anything else) that changes a static-batch graph shows here."""
    env = dict(os.environ)
    subprocess.run([sys.executable, "-m", "build.engines", "--profile", "fp16", "--stop-after", "surgery",
                    "--out", str(tmp_path / "out")], cwd=ROOT, env=env, check=True, capture_output=True)
    [target] = [p for p in (tmp_path / "out").iterdir() if p.is_dir()]
    for name, want in DEFAULT_HASHES.items():
        assert hashlib.sha256((target / "fp16" / name).read_bytes()).hexdigest() == want, name
