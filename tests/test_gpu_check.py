"""The prepared device check (bench/gpu_check.py), as far as a CPU runs it: its arguments, the
wheel split and reassembly that carries a wheel over two calls, and the report written from a
real measurement of a tiny preset on this CPU."""
from __future__ import annotations

import hashlib
import json
import os
import zipfile

import pytest

from bench import gpu_check


def _args(*argv):
    p = gpu_check.parser()
    args = p.parse_args(["run", *argv])
    gpu_check.check_run_args(args, p)
    return args


# --------------------------------------------------------------------------- arguments

def test_defaults_are_the_issue_s_measurements():
    args = _args()
    assert args.parts == ["timing", "bandwidth", "export", "tensorrt"]
    assert args.modes == ["eager", "cuda-graph", "compile"] and args.impls == ["transformers", "kvplan"]
    assert args.decode_lastsum == [302, 2048] and args.prefill == 303 and args.steps == 100
    assert args.device == "cuda" and args.model == "minicpmo26-tts"
    assert args.export_dtypes == ["float16", "bfloat16"]


@pytest.mark.parametrize("argv, message", [
    (["--parts", "timing,gpu"], "gpu not among"),
    (["--modes", "eager,graph"], "graph not among"),
    (["--decode-lastsum", "302,x"], "not a comma list of integers"),
    (["--decode-lastsum", "-1"], "non-negative"),
    (["--steps", "50"], "at least 100 steps"),
    (["--device", "tpu"], "not cuda, cuda:K or cpu"),
])
def test_bad_arguments_are_refused_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _args(*argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_fewer_steps_are_allowed_on_a_cpu():
    assert _args("--device", "cpu", "--steps", "3").steps == 3


# --------------------------------------------------------------------------- wheels in parts

@pytest.fixture
def wheel(tmp_path):
    """A real (small, incompressible) wheel: a zip with a dist-info, written with zipfile."""
    path = tmp_path / "demo_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("demo_pkg/__init__.py", "VALUE = 42\n")
        z.writestr("demo_pkg/blob.bin", os.urandom(2_500_000))
        z.writestr("demo_pkg-1.0.dist-info/METADATA", "Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n")
        z.writestr("demo_pkg-1.0.dist-info/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                                                    "Tag: py3-none-any\n")
        z.writestr("demo_pkg-1.0.dist-info/RECORD", "")
    return path


def test_a_wheel_split_into_parts_joins_back_byte_for_byte(wheel, tmp_path):
    parts = tmp_path / "parts"
    assert gpu_check.main(["split", str(wheel), "--out", str(parts), "--max-mib", "1"]) == 0
    pieces = sorted(p.name for p in parts.glob("*.part[0-9]*"))
    assert pieces == [f"{wheel.name}.part{k}" for k in range(3)]
    assert all((parts / p).stat().st_size <= 1 << 20 for p in pieces)
    # The parts travel in separate calls: each call's folder holds some of them.
    first, second = tmp_path / "call1", tmp_path / "call2"
    first.mkdir(), second.mkdir()
    for p in parts.iterdir():
        (first if p.name.endswith((".part0", ".json")) else second).joinpath(p.name).write_bytes(p.read_bytes())
    gathered = tmp_path / "gathered"
    gathered.mkdir()
    for d in (first, second):
        for p in d.iterdir():
            (gathered / p.name).write_bytes(p.read_bytes())
    assert gpu_check.main(["join", str(gathered), "--out", str(tmp_path / "wheels")]) == 0
    joined = tmp_path / "wheels" / wheel.name
    assert hashlib.sha256(joined.read_bytes()).digest() == hashlib.sha256(wheel.read_bytes()).digest()
    with zipfile.ZipFile(joined) as z:
        assert z.testzip() is None and z.read("demo_pkg/__init__.py") == b"VALUE = 42\n"


def test_a_joined_wheel_installs(wheel, tmp_path):
    gpu_check.split_wheel(wheel, tmp_path / "parts", 1 << 20)
    gpu_check.join_wheels(tmp_path / "parts", tmp_path / "wheels")
    site = tmp_path / "site"
    rec = gpu_check.install_wheels(tmp_path / "wheels", site)
    try:
        assert rec["rc"] == 0, rec["tail"]
        assert (site / "demo_pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    finally:
        import sys
        if str(site) in sys.path:
            sys.path.remove(str(site))


def test_a_missing_part_is_named(wheel, tmp_path):
    gpu_check.split_wheel(wheel, tmp_path / "parts", 1 << 20)
    (tmp_path / "parts" / f"{wheel.name}.part1").unlink()
    with pytest.raises(SystemExit, match=r"parts missing .*\.part1"):
        gpu_check.join_wheels(tmp_path / "parts", tmp_path / "wheels")
    assert not (tmp_path / "wheels" / wheel.name).exists()


def test_a_damaged_part_is_named_and_nothing_is_left_under_the_wheel_s_name(wheel, tmp_path):
    gpu_check.split_wheel(wheel, tmp_path / "parts", 1 << 20)
    part = tmp_path / "parts" / f"{wheel.name}.part2"
    data = bytearray(part.read_bytes())
    data[10] ^= 0xFF
    part.write_bytes(bytes(data))
    with pytest.raises(SystemExit, match=r"part2: sha256 differs"):
        gpu_check.join_wheels(tmp_path / "parts", tmp_path / "wheels")
    assert list((tmp_path / "wheels").iterdir()) == []


# --------------------------------------------------------------------------- a real measurement, reported

@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """The check's timing, bandwidth and export parts on the tiny-llama preset on this CPU."""
    out = tmp_path_factory.mktemp("report")
    args = _args("--device", "cpu", "--model", "tiny-llama", "--steps", "3", "--warmup", "1",
                 "--parts", "timing,bandwidth,export", "--modes", "eager,cuda-graph", "--decode-lastsum", "4,16",
                 "--prefill", "8", "--bandwidth-mib", "8", "--out", str(out), "--date", "test")
    result = gpu_check.run(args, log=lambda *_: None)
    return result, out


@pytest.mark.slow  # a real CPU measurement and two cold exports: about 45 s
def test_the_report_holds_the_measurement_and_names_the_machine(cpu_report):
    result, out = cpu_report
    assert result["errors"] == {}
    saved = json.loads((out / "gpu-test.json").read_text())
    assert saved["machine"]["versions"]["torch"] and saved["machine"]["gpu"] is None
    eager = [r for r in saved["timing"] if r["mode"] == "eager"]
    assert len(eager) == 6 and all(r["median_ms"] > 0 and r["steps"] == 3 for r in eager)
    graphs = [r for r in saved["timing"] if r["mode"] == "cuda-graph"]
    assert all(r["ran"] is False and r["why"] == "CUDA graphs need a CUDA device" for r in graphs)
    assert saved["bandwidth"]["gb_per_s"] > 0
    assert [b["shape"] for b in saved["bounds"]] == ["decode lastSum 4", "decode lastSum 16", "prefill 8"]
    md = (out / "gpu-test.md").read_text()
    assert md.startswith("# Device check test: no GPU (tiny-llama)")
    assert "| kvplan | decode lastSum 16 | eager |" in md and "not run: CUDA graphs need a CUDA device" in md
    assert "Device-to-device copy:" in md


@pytest.mark.slow  # a real CPU measurement and two cold exports: about 45 s
def test_exports_match_the_contract_and_onnx_runtime_matches_pytorch(cpu_report):
    result, out = cpu_report
    fp16, bf16 = result["export"]["float16"], result["export"]["bfloat16"]
    assert fp16["contract_ok"] and bf16["contract_ok"]
    assert fp16["onnxruntime_ran"] and fp16["ok"] and fp16["max_abs"] < fp16["atol"]
    assert bf16["onnxruntime_ran"] is False and "NOT_IMPLEMENTED" in bf16["why"]
    md = (out / "gpu-test.md").read_text()
    assert "- float16: matches the I/O contract; ONNX Runtime (CPU) vs PyTorch on cpu" in md


def test_the_memory_bound_counts_weights_cache_and_new_rows():
    from kvplan.models import resolve
    cfg = resolve("minicpmo26-tts").config
    s = gpu_check.Shape("decode", 1, 302)
    row = 2 * 20 * 12 * 64 * 2                      # K and V, 20 layers, 12 kv heads, head_dim 64, fp16
    assert gpu_check.traffic_bytes(cfg, s, 2, 1000) == 1000 + row * 302 + row
    [b] = gpu_check.bounds(cfg, [s], {"gb_per_s": 1.0}, 1000)
    assert b["bound_ms"] == round((1000 + row * 303) / 1e9 * 1e3, 4)


def test_every_timed_transformers_step_starts_from_the_same_cache():
    """The step crops its DynamicCache back to lastSum rows: repeated steps do the same work."""
    import torch

    from kvplan.models import resolve
    _, step = gpu_check.transformers_step(resolve("tiny-llama"), torch.float32, torch.device("cpu"),
                                          gpu_check.Shape("d", 1, 5))
    a, b = step().last_hidden_state, step().last_hidden_state
    assert torch.equal(a, b)
