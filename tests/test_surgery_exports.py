"""Surgery on kvplan's own exports: exact fusion counts, ONNX Runtime parity, TensorRT-RTX parsing, CLI."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from kvplan import surgery
from kvplan.export.exporter import TORCH_DTYPES, example_inputs, input_names
from kvplan.models import resolve

ROOT = Path(__file__).resolve().parent.parent

# Each preset in both dtypes and both KV layouts, and every (dtype, layout) pair
# at least once, with six exports instead of twelve (each takes ~15 s here).
CASES = [
    ("tiny-llama", "float32", 0), ("tiny-llama", "float16", 1),
    ("tiny-qwen2", "float32", 1), ("tiny-qwen2", "float16", 0),
    ("tiny-qwen3", "float32", 0), ("tiny-qwen3", "float16", 1),
]
IDS = [f"{p}-{d}-kv{k}" for p, d, k in CASES]
SHAPES = [(8, 0), (1, 302), (10, 303)]  # (N, lastSum): first prefill, first decode step, chunk after it
# fp16: the fused ops round differently inside (RMSNormalization divides by the RMS
# where the graph multiplies by its reciprocal; RotaryEmbedding may keep x*cos + rot*sin
# in fp32 before rounding), so outputs may differ by an fp16 ulp or two per layer.
# With |outputs| < 8 an ulp is at most 2**-8 ≈ 0.0039; measured: 0.00195 (one ulp at
# magnitude 2..4). 1e-2 allows a few ulps after four layers, while a wrong rotation or
# a wrong epsilon shows up as differences of order 0.1..1.
ATOL = {"float32": 1e-4, "float16": 1e-2}
NORM_OPS = ("Pow", "ReduceMean", "Sqrt", "Reciprocal")


@pytest.fixture(scope="session")
def fused_tiny(export_tiny, tmp_path_factory):
    """fused_tiny(preset, dtype, kv_format) -> (pack, fused path, report), fused once per session."""
    cache = {}

    def get(preset, dtype, kv_format):
        key = (preset, dtype, kv_format)
        if key not in cache:
            (pack,) = export_tiny(preset, dtype, kv_format)
            out = tmp_path_factory.mktemp(f"fused-{preset}-{dtype}-kv{kv_format}") / "decoder.fused.onnx"
            report = surgery.fuse_file(pack.path, out, ["rmsnorm", "rope"], log=None)
            cache[key] = (pack, out, report)
        return cache[key]

    return get


def expected_counts(preset):
    cfg = resolve(preset).config
    norms = 2 * cfg.num_layers + 1 + (2 * cfg.num_layers if cfg.qk_norm else 0)
    return norms, 2 * cfg.num_layers


@pytest.mark.parametrize("preset,dtype,kv_format", CASES, ids=IDS)
def test_every_norm_and_rotary_is_fused(fused_tiny, preset, dtype, kv_format):
    _, path, report = fused_tiny(preset, dtype, kv_format)
    norms, ropes = expected_counts(preset)
    assert report["passes"]["rmsnorm"] == {"fused": norms, "near_misses": []}
    assert report["passes"]["rope"] == {"fused": ropes, "near_misses": []}
    counts = report["ops_after"]
    assert counts["RMSNormalization"] == norms and counts["RotaryEmbedding"] == ropes
    for op in (*NORM_OPS, "Neg"):
        assert op not in counts, f"{op} left after surgery"
    # The only Slices left are the two half-caches (cos, sin) shared by every layer.
    assert counts.get("Slice", 0) == 2
    assert report["nodes_after"] < report["nodes_before"]
    m = onnx.load(path)
    assert {o.domain: o.version for o in m.opset_import}[""] == 23


def test_qwen3_fuses_per_head_qk_norms(fused_tiny):
    _, path, _ = fused_tiny("tiny-qwen3", "float32", 0)
    m = onnx.load(path)
    cfg = resolve("tiny-qwen3").config
    by_scale = [n.input[1] for n in m.graph.node if n.op_type == "RMSNormalization"]
    assert sum("q_norm" in s or "k_norm" in s for s in by_scale) == 2 * cfg.num_layers
    eps = {round(n.attribute[[a.name for a in n.attribute].index("epsilon")].f, 12)
           for n in m.graph.node if n.op_type == "RMSNormalization"}
    assert eps == {round(float(np.float32(cfg.rms_norm_eps)), 12)}


@pytest.mark.parametrize("preset,dtype,kv_format", CASES, ids=IDS)
def test_dynamic_axes_survive(fused_tiny, preset, dtype, kv_format):
    pack, path, _ = fused_tiny(preset, dtype, kv_format)

    def dims(m):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in list(m.graph.input) + list(m.graph.output)}
    before, after = dims(onnx.load(pack.path)), dims(onnx.load(path))
    assert after == before
    assert after["hidden_in"][1] == "N" and after["attention_mask"][2:] == ["N", "sumN"]


def session(path):
    so = ort.SessionOptions()
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("preset,dtype,kv_format", CASES, ids=IDS)
def test_onnxruntime_fused_matches_unfused(fused_tiny, preset, dtype, kv_format):
    pack, path, _ = fused_tiny(preset, dtype, kv_format)
    cfg = resolve(preset).config
    ref, fused = session(pack.path), session(path)
    for n, last in SHAPES:
        args = example_inputs(cfg, pack.spec, 1, TORCH_DTYPES[dtype], n, last)
        feeds = {k: v.numpy() for k, v in zip(input_names(pack.spec), args)}
        want, got = ref.run(None, feeds), fused.run(None, feeds)
        for w, g in zip(want, got):
            assert g.dtype == w.dtype and g.shape == w.shape
            diff = float(np.abs(g.astype(np.float32) - w.astype(np.float32)).max())
            assert diff <= ATOL[dtype], f"(N, lastSum)=({n}, {last}): max abs diff {diff}"


@pytest.mark.parametrize("preset,dtype,kv_format", CASES, ids=IDS)
def test_tensorrt_rtx_parses_one_rotary_layer_per_fused_rope(fused_tiny, preset, dtype, kv_format):
    trt = pytest.importorskip("tensorrt_rtx", reason="tensorrt_rtx is not installed (pip install tensorrt-rtx-cu13)")
    _, path, report = fused_tiny(preset, dtype, kv_format)
    logger = trt.Logger(trt.Logger.ERROR)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    ok = parser.parse(path.read_bytes())
    assert ok, [parser.get_error(i).desc() for i in range(parser.num_errors)]
    types = [network.get_layer(i).type for i in range(network.num_layers)]
    assert types.count(trt.LayerType.ROTARY_EMBEDDING) == report["passes"]["rope"]["fused"]


def test_cli_fuses_and_writes_report(fused_tiny, tmp_path):
    pack, _, _ = fused_tiny("tiny-llama", "float32", 0)
    out, rep = tmp_path / "fused.onnx", tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "surgery", str(pack.path), "-o", str(out), "--passes", "rmsnorm,rope",
                        "--report", str(rep)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "rmsnorm: fused 9" in r.stdout and "rope: fused 8" in r.stdout
    counts = json.loads(rep.read_text())["ops_after"]
    assert counts["RMSNormalization"] == 9 and counts["RotaryEmbedding"] == 8
    assert [n.op_type for n in onnx.load(out).graph.node].count("RotaryEmbedding") == 8


def test_cli_bad_pass_name_fails_naming_it(fused_tiny, tmp_path):
    pack, _, _ = fused_tiny("tiny-llama", "float32", 0)
    r = subprocess.run([sys.executable, "-m", "surgery", str(pack.path), "-o", str(tmp_path / "x.onnx"),
                        "--passes", "rmsnorm,flash"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "'flash'" in r.stderr and "rmsnorm, rope" in r.stderr
    assert not (tmp_path / "x.onnx").exists()


def test_cli_missing_input_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "surgery", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "x.onnx")],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "not found" in r.stderr and "none.onnx" in r.stderr


def test_cli_help_documents_every_flag():
    r = subprocess.run([sys.executable, "-m", "surgery", "--help"], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0
    for flag in ("--output", "--passes", "--report", "--quiet"):
        assert flag in r.stdout


@pytest.mark.slow
def test_default_model_fp16_has_41_norms_and_40_rotaries(export_tiny, tmp_path):
    (pack,) = export_tiny("minicpmo26-tts", "float16", 0)
    t0 = time.perf_counter()
    report = surgery.fuse_file(pack.path, tmp_path / "decoder.fused.onnx", ["rmsnorm", "rope"], log=None)
    assert report["ops_after"]["RMSNormalization"] == 41
    assert report["ops_after"]["RotaryEmbedding"] == 40
    assert not report["passes"]["rmsnorm"]["near_misses"] and not report["passes"]["rope"]["near_misses"]
    print(f"minicpmo26-tts fp16: nodes {report['nodes_before']} -> {report['nodes_after']}, "
          f"surgery {report['seconds']} s, fuse_file {time.perf_counter() - t0:.1f} s")


def test_weights_set_aside_during_surgery_come_back_unchanged(export_tiny, tmp_path, monkeypatch):
    """fuse_file keeps MatMul weights out of surgery's protobuf copies and restores them."""
    import onnx

    from kvplan import surgery
    from kvplan.surgery.weights import put_back, set_aside
    monkeypatch.setattr(surgery.weights, "MIN_BYTES", 1)     # the tiny model's matrices are small
    [pack] = export_tiny("tiny-llama", "float32")
    model = onnx.load(pack.path)
    before = {t.name: t.raw_data for t in model.graph.initializer}
    aside = set_aside(model)
    assert aside and all(n not in {t.name for t in model.graph.initializer} for n in aside)
    assert {t.name for t in model.graph.initializer} | set(aside) == set(before)
    put_back(model, aside)
    assert {t.name: t.raw_data for t in model.graph.initializer} == before
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(pack.path).graph.input]
    surgery.fuse_file(pack.path, tmp_path / "f.onnx", ["rmsnorm", "rope"], log=None)
    fused = onnx.load(tmp_path / "f.onnx")
    assert {t.name: t.raw_data for t in fused.graph.initializer if t.name in aside} == {n: before[n] for n in aside}
    assert [i.name for i in fused.graph.input] == [i.name for i in onnx.load(pack.path).graph.input]


def test_streamed_write_is_the_model_with_its_weights_appended(export_tiny, tmp_path):
    """write_streamed: the model without some initializers, then those initializers one at a
    time, parses back to the very model that has them all."""
    import onnx

    from kvplan.fileio import write_streamed
    [pack] = export_tiny("tiny-llama", "float32")
    model = onnx.load(pack.path)
    head = onnx.ModelProto()
    head.CopyFrom(model)
    tail = list(head.graph.initializer)[-7:]
    del head.graph.initializer[-7:]
    with open(tmp_path / "s.onnx", "wb") as f:
        write_streamed(head, lambda: iter(tail), f)
    assert onnx.load(tmp_path / "s.onnx") == model


def test_a_weight_whose_stand_in_changed_is_not_written_back(export_tiny, monkeypatch):
    import onnx

    from kvplan.surgery.weights import set_aside, take_back
    monkeypatch.setattr(surgery.weights, "MIN_BYTES", 1)
    [pack] = export_tiny("tiny-llama", "float32")
    model = onnx.load(pack.path)
    aside = set_aside(model)
    stand_in = next(v for v in model.graph.input if v.name in aside)
    stand_in.type.tensor_type.elem_type = onnx.TensorProto.FLOAT16
    with pytest.raises(RuntimeError, match=f"weight input '{stand_in.name}' changed during surgery"):
        take_back(model, aside)


def test_the_fused_file_gets_the_mode_of_any_new_file(export_tiny, tmp_path):
    """Written through a private temp file, but landing with the umask's mode, like the export."""
    import os
    [pack] = export_tiny("tiny-llama", "float32")
    old = os.umask(0o022)
    try:
        surgery.fuse_file(pack.path, tmp_path / "f.onnx", ["rmsnorm"], log=None)
    finally:
        os.umask(old)
    assert (tmp_path / "f.onnx").stat().st_mode & 0o777 == 0o644


def test_a_fused_file_with_external_data_lands_whole_with_the_usual_mode(export_tiny, tmp_path, monkeypatch):
    """Above protobuf's comfortable size the weights go to a data file next to the graph."""
    import os

    import onnx

    monkeypatch.setattr(surgery.fileio, "PROTO_LIMIT", 1000)
    [pack] = export_tiny("tiny-llama", "float32")
    old = os.umask(0o022)
    try:
        surgery.fuse_file(pack.path, tmp_path / "f.onnx", ["rmsnorm", "rope"], log=None)
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.onnx", "f.onnx.data"]
    assert {p.stat().st_mode & 0o777 for p in tmp_path.iterdir()} == {0o644}
    fused = onnx.load(tmp_path / "f.onnx")
    onnx.checker.check_model(fused)
    assert [i.name for i in fused.graph.input] == [i.name for i in onnx.load(pack.path).graph.input]
