"""TensorRT engine builds on the tiny presets (TensorRT-RTX builds on CPU; running needs a GPU)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from kvplan import profiles
from kvplan.decoder import pack_specs
from kvplan.export.exporter import export_pack, io_contract
from kvplan.models import resolve
from kvplan.trt.backend import BackendError, rtx_supports, select_backend, visible_gpus

build_trt = pytest.importorskip("kvplan.trt")
BuildError = build_trt.BuildError


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny-llama, float16, kv_format 0, exported once."""
    src = resolve("tiny-llama")
    spec = pack_specs(src.config, 0, 0)[0]
    out = tmp_path_factory.mktemp("tiny_fp16")
    onnx_path = out / "decoder.onnx"
    export_pack(src, spec, "float16", 1, onnx_path)
    return {"cfg": src.config, "spec": spec, "onnx": onnx_path,
            "contract": io_contract(src.config, spec, 1, "float16")}


@pytest.fixture(scope="session")
def fast_profile():
    # Level 0 builds as fast as any on CPU with TensorRT-RTX; both profiles of fp16.toml.
    return profiles.load("fp16").with_engine(optimization_level=0)


@pytest.fixture(scope="session")
def built(tiny, fast_profile, backend):
    """The fp16 profile's engine, built next to the ONNX (so inspect finds its source)."""
    plan = tiny["onnx"].parent / "decoder.plan"
    lines: list[str] = []
    record = build_trt.build_engine(tiny["onnx"], plan, fast_profile, tiny["contract"], backend,
                                    tiny["onnx"].parent / "timing.cache", log=lines.append)
    return {"plan": plan, "record": record, "log": lines}


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".plan") or ".kvplan-tmp-" in p.name)


# --------------------------------------------------------------------------- backend

def test_auto_picks_an_importable_backend(backend):
    caps, how = visible_gpus()
    try:
        import tensorrt  # noqa: F401
        full = True
    except ImportError:
        full = False
    # Full TensorRT's builder needs a GPU: without one, auto takes TensorRT-RTX.
    if not full or not caps:
        assert backend.name == "tensorrt-rtx"
    assert backend.can_build
    assert backend.version and backend.module is not None
    assert backend.version == backend.module.__version__      # read from its metadata, before the import
    assert isinstance(backend.strongly_typed_flag, int)
    if not caps:
        assert backend.can_run is False
        assert backend.why_not_run == "no CUDA GPU visible"


def test_missing_backend_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)      # makes `import tensorrt` fail everywhere
    with pytest.raises(BackendError) as err:
        select_backend("tensorrt")
    msg = str(err.value)
    assert "'tensorrt'" in msg and "not importable" in msg
    assert "pip install 'kvplan[tensorrt-rtx]'" in msg
    assert "NVIDIA" in msg


def test_unknown_backend_name():
    with pytest.raises(BackendError, match="unknown TensorRT backend"):
        select_backend("onnxruntime")


def test_rtx_compute_capabilities():
    assert all(rtx_supports(cc) for cc in ("7.5", "8.0", "8.6", "8.9", "12.0", "12.1"))
    assert not any(rtx_supports(cc) for cc in ("9.0", "7.0", "10.0", "garbage"))


# --------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("kv_format", [0, 1])
def test_shapes_for_is_consistent(kv_format):
    cfg = resolve("tiny-llama").config
    spec = pack_specs(cfg, 0, kv_format)[0]
    contract = io_contract(cfg, spec, 1, "float16")
    prof = profiles.load("fp16")
    shapes = build_trt.shapes_for(contract, prof)
    assert list(shapes) == [s.name for s in prof.shapes]
    seq_axis = 2 if kv_format == 0 else 1
    for sp in prof.shapes:
        per = shapes[sp.name]
        assert set(per) == set(contract["inputs"])
        for k, which in enumerate(("min", "opt", "max")):
            n, last = getattr(sp.N, which), getattr(sp.lastSum, which)
            assert per["hidden_in"][k] == (1, n, cfg.hidden_size)
            assert per["position_ids"][k] == (1, n)
            assert per["attention_mask"][k] == (1, 1, n, n + last)          # sumN = N + lastSum
            for i in spec.layers:
                for kind in ("key", "value"):
                    shape = per[f"past_{kind}_in{i}"][k]
                    assert shape[seq_axis] == last
                    want = [1, cfg.num_kv_heads, last, cfg.head_dim] if kv_format == 0 else \
                        [1, last, cfg.num_kv_heads, cfg.head_dim]
                    assert list(shape) == want


def test_shapes_for_rejects_unknown_axis():
    contract = {"inputs": {"x": {"shape": [1, "T"], "dtype": "float16"}}}
    with pytest.raises(BuildError, match="unknown symbolic axis 'T'"):
        build_trt.shapes_for(contract, profiles.load("fp16"))


# --------------------------------------------------------------------------- build

def test_build_writes_plan_and_record(built, tiny, fast_profile, backend):
    plan, record = built["plan"], built["record"]
    assert plan.is_file() and plan.stat().st_size > 0
    assert record["plan_bytes"] == plan.stat().st_size
    assert record["plan"] == "decoder.plan"
    assert record["backend"] == backend.name and record["backend_version"] == backend.version
    assert record["onnx"] == str(tiny["onnx"]) and len(record["onnx_sha256"]) == 64
    assert record["build_seconds"] > 0
    json.dumps(record)                                             # JSON-serialisable
    assert not [p for p in plan.parent.iterdir() if ".kvplan-tmp-" in p.name]

    # One optimization profile per Shapes; shapes read back from TensorRT's profiles.
    assert list(record["profiles"]) == ["prefill", "decode"]
    pre, dec = record["profiles"]["prefill"], record["profiles"]["decode"]
    assert pre["hidden_in"] == {"min": [1, 1, 64], "opt": [1, 303, 64], "max": [1, 512, 64]}
    assert pre["attention_mask"] == {"min": [1, 1, 1, 1], "opt": [1, 1, 303, 303], "max": [1, 1, 512, 4096]}
    assert pre["past_key_in0"] == {"min": [1, 2, 0, 16], "opt": [1, 2, 0, 16], "max": [1, 2, 3584, 16]}
    assert dec["position_ids"] == {"min": [1, 1], "opt": [1, 1], "max": [1, 2]}
    assert dec["attention_mask"] == {"min": [1, 1, 1, 2], "opt": [1, 1, 1, 303], "max": [1, 1, 2, 4096]}
    assert dec["past_value_in3"] == {"min": [1, 2, 1, 16], "opt": [1, 2, 302, 16], "max": [1, 2, 4094, 16]}

    # The network's inputs are the contract's, dynamic where the contract is symbolic.
    net = record["network"]
    assert net["inputs"]["hidden_in"] == {"shape": [1, -1, 64], "dtype": "HALF"}
    assert net["inputs"]["position_ids"]["dtype"] == "INT64"
    assert net["inputs"]["past_key_in0"]["shape"] == [1, 2, -1, 16]
    assert set(net["outputs"]) == set(tiny["contract"]["outputs"])
    assert net["layers"] == sum(net["layer_types"].values()) > 0
    assert net["layer_types"].get("MATRIX_MULTIPLY", 0) >= 7 * 4      # q k v o gate up down, 4 layers

    opts = record["options"]
    assert opts["optimization_level"] == 0 and opts["strongly_typed"] is True

    mem = record["memory"]
    assert mem["weights_bytes_onnx"] > 0
    if not backend.can_run:
        assert mem["device_memory_size"] is None and backend.why_not_run in mem["engine_memory_why"]
    if mem["builder_reported"] is not None:
        per = mem["builder_reported"]["per_profile"]
        assert set(per) == {"prefill", "decode"}
        assert per["prefill"]["total_activation_memory_bytes"] > 0

    # Progress monitor logged nested phases.
    assert record["progress"]["phases"] > 0 and record["progress"]["steps"] > 0
    assert any(line.startswith("[build] Building engine") for line in built["log"])
    assert any(line.startswith("[build]   ") for line in built["log"])       # nested phase

    cmd = record["trtexec"]
    assert cmd.split()[0] == backend.tool
    assert f"--onnx={tiny['onnx']}" in cmd and f"--saveEngine={built['plan']}" in cmd
    assert "--profile=0" in cmd and "--profile=1" in cmd
    assert "--minShapes=hidden_in:1x1x64,attention_mask:1x1x1x1," in cmd
    assert "--maxShapes=hidden_in:1x2x64,attention_mask:1x1x2x4096," in cmd


def test_timing_cache(built, tiny, fast_profile, backend, tmp_path):
    cache = tiny["onnx"].parent / "timing.cache"
    tc = built["record"]["timing_cache"]
    supported, why = build_trt.timing_cache_supported(backend)
    if supported:
        assert cache.is_file() and cache.stat().st_size > 0
        assert tc["saved_bytes"] == cache.stat().st_size
        again = build_trt.build_engine(tiny["onnx"], tmp_path / "decoder.plan", fast_profile, tiny["contract"],
                                       backend, cache, log=lambda *_: None)
        assert again["timing_cache"]["loaded_bytes"] == tc["saved_bytes"]
    else:
        # TensorRT-RTX: timing cache operations are no-ops; nothing is written, and the record says why.
        assert tc == {"path": str(cache), "supported": False, "used": False, "why": why}
        assert not cache.exists()
    # The load/save path itself (the API exists on both backends): written, then read back.
    trt = backend.module
    cfg = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    build_trt.load_timing_cache(cfg, tmp_path / "t.cache", log=lambda *_: None)
    size = build_trt.save_timing_cache(cfg, tmp_path / "t.cache")
    assert size > 0 and (tmp_path / "t.cache").stat().st_size == size
    cfg2 = trt.Builder(trt.Logger(trt.Logger.ERROR)).create_builder_config()
    _, loaded = build_trt.load_timing_cache(cfg2, tmp_path / "t.cache", log=lambda *_: None)
    assert loaded == size


def test_build_raising_midway_leaves_nothing(tiny, fast_profile, backend, tmp_path, monkeypatch):
    trt = backend.module

    def boom(self, *args):
        raise RuntimeError("builder exploded")

    streamed = hasattr(trt.Builder, "build_serialized_network_to_stream")
    with monkeypatch.context() as m:
        m.setattr(trt.Builder, "build_serialized_network_to_stream" if streamed else "build_serialized_network", boom)
        with pytest.raises(RuntimeError, match="builder exploded"):
            build_trt.build_engine(tiny["onnx"], tmp_path / "decoder.plan", fast_profile, tiny["contract"],
                                   backend, None, log=lambda *_: None)
    assert _leftovers(tmp_path) == []


def test_interrupt_from_progress_cancels_build(tiny, fast_profile, backend, tmp_path):
    """Ctrl-C lands in the progress monitor's Python callback: the build is cancelled, the
    KeyboardInterrupt re-raised, and no plan or temp file is left."""
    def log(line):
        if "Building engine from subgraph" in line:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_trt.build_engine(tiny["onnx"], tmp_path / "decoder.plan", fast_profile, tiny["contract"],
                               backend, None, log=log)
    assert _leftovers(tmp_path) == []


def test_failing_plan_write_removes_temp(tiny, fast_profile, backend, tmp_path, monkeypatch):
    def fail(src, dst):
        raise OSError("disk full")     # as a network file system reports a failed write late

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        build_trt.build_engine(tiny["onnx"], tmp_path / "decoder.plan", fast_profile, tiny["contract"],
                               backend, None, log=lambda *_: None)
    monkeypatch.undo()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("content", [b"this is not a protobuf", None])
def test_corrupted_onnx_names_the_file(tiny, fast_profile, backend, tmp_path, content):
    bad = tmp_path / "decoder.onnx"
    data = tiny["onnx"].read_bytes()
    bad.write_bytes(content if content is not None else data[: len(data) // 3])
    with pytest.raises(BuildError) as err:
        build_trt.build_engine(bad, tmp_path / "decoder.plan", fast_profile, tiny["contract"], backend, None,
                               log=lambda *_: None)
    assert str(bad) in str(err.value) and "parser" in str(err.value)
    assert _leftovers(tmp_path) == []


def test_missing_onnx(fast_profile, tiny, backend, tmp_path):
    with pytest.raises(BuildError, match="no such ONNX file"):
        build_trt.build_engine(tmp_path / "nope.onnx", tmp_path / "decoder.plan", fast_profile,
                               tiny["contract"], backend, None, log=lambda *_: None)


def test_contract_mismatch(tiny, fast_profile, backend, tmp_path):
    contract = json.loads(json.dumps(tiny["contract"]))
    contract["inputs"]["past_key_in0"]["shape"] = [1, 2, "lastSum"]          # wrong rank
    contract["inputs"]["extra"] = {"shape": [1], "dtype": "float16"}
    with pytest.raises(BuildError) as err:
        build_trt.build_engine(tiny["onnx"], tmp_path / "decoder.plan", fast_profile, contract, backend, None,
                               log=lambda *_: None)
    msg = str(err.value)
    assert str(tiny["onnx"]) in msg and "missing inputs ['extra']" in msg and "past_key_in0: rank 4" in msg


def test_backend_specific_options(tiny, fast_profile, backend, tmp_path):
    cc = ("8.6", "12.0") if backend.is_rtx else ()
    prof = fast_profile.with_engine(compute_capabilities=cc, hardware_compatibility="ampere_plus",
                                    version_compatible=True, workspace_mib=256, shapes=fast_profile.shapes[1:])
    if not backend.is_rtx:
        pytest.skip("the option skips checked here are TensorRT-RTX's")
    lines: list[str] = []
    rec = build_trt.build_engine(tiny["onnx"], tmp_path / "decoder.plan", prof, tiny["contract"], backend, None,
                                 log=lines.append)
    assert rec["options"]["compute_capabilities"] == ["8.6", "12.0"]
    assert rec["options"]["workspace_mib"] == 256
    assert rec["options"]["version_compatible"] is False
    assert rec["options"]["hardware_compatibility"] == "none (skipped)"
    assert len(rec["notes"]) == 2 and all("skipped" in n for n in rec["notes"])
    assert any("note: version_compatible" in line for line in lines)
    assert "--memPoolSize=workspace:256M" in rec["trtexec"]
    assert list(rec["profiles"]) == ["decode"] and "--profile=1" not in rec["trtexec"]
    # A compute capability TensorRT-RTX does not build for (Hopper) is refused before building.
    with pytest.raises(BuildError, match="'9.0' is not a compute capability"):
        build_trt.build_engine(tiny["onnx"], tmp_path / "decoder.plan",
                               prof.with_engine(compute_capabilities=("9.0",)), tiny["contract"],
                               backend, None, log=lambda *_: None)


# --------------------------------------------------------------------------- inspect

def test_inspect_plan(built, backend):
    lines: list[str] = []
    info = build_trt.inspect(built["plan"], backend, log=lines.append)
    assert info["onnx"] == str(built["plan"].with_suffix(".onnx"))
    text = "\n".join(lines)
    assert "layers" in text and "input  hidden_in: HALF [1, -1, 64]" in text
    assert "MATRIX_MULTIPLY" in text
    rows = info["network"]["layer_table"]
    assert len(rows) == info["network"]["layers"] == built["record"]["network"]["layers"]
    assert rows[0]["index"] == 0 and rows[0]["outputs"][0]["dtype"]
    if backend.can_run:
        assert info["engine"] is not None
    else:
        assert info["engine"] is None and backend.why_not_run in info["engine_why"]
        assert any(backend.why_not_run in line for line in lines)


def test_inspect_onnx(tiny, backend):
    info = build_trt.inspect(tiny["onnx"], backend, log=lambda *_: None)
    assert info["network"]["layers"] > 0 and info["engine"] is None


def test_inspect_plan_without_source(built, backend, tmp_path):
    lonely = tmp_path / "decoder.plan"
    lonely.write_bytes(built["plan"].read_bytes())
    lines: list[str] = []
    info = build_trt.inspect(lonely, backend, log=lines.append)
    assert info["network"] is None and "no source ONNX" in lines[0]


# --------------------------------------------------------------------------- runtime

def test_engine_check_reports_why_not(built, tiny, fast_profile, backend):
    if backend.can_run:
        pytest.skip("this machine can run engines; see the gpu test")
    rec = build_trt.run_engine_check(built["plan"], fast_profile, tiny["contract"], tiny["onnx"], backend,
                                     log=lambda *_: None)
    assert rec == {"ran": False, "why": backend.why_not_run}


def test_engine_check_reference_side(tiny, fast_profile):
    """The half of the runtime check that runs without a GPU: opt-shape inputs and the
    ONNX Runtime reference outputs."""
    import torch
    shapes = build_trt.shapes_for(tiny["contract"], fast_profile)
    for sp in fast_profile.shapes:
        inputs = build_trt.runtime_check._check_inputs(tiny["contract"], sp, shapes[sp.name], "float16", seed=0)
        n, last = sp.N.opt, sp.lastSum.opt
        assert inputs["position_ids"].tolist() == [list(range(last, last + n))]
        mask = inputs["attention_mask"]
        assert mask.shape == (1, 1, n, n + last) and mask.dtype == torch.float16
        assert mask[0, 0, 0, last].item() == 0 and (n == 1 or mask[0, 0, 0, last + 1].item() < -1e4)
        out = build_trt.runtime_check._ort_run(tiny["onnx"], inputs)
        assert out["hidden_out"].shape == (1, n, 64)
        assert out["past_key0"].shape == (1, 2, n + last, 16)
        assert all(v.dtype.name == "float32" for v in out.values())


@pytest.mark.gpu
def test_engine_matches_onnxruntime(backend, fast_profile, request):
    if not backend.can_run:
        pytest.skip(f"needs a CUDA GPU the backend can run engines on: {backend.why_not_run}")
    built, tiny = request.getfixturevalue("built"), request.getfixturevalue("tiny")
    rec = build_trt.run_engine_check(built["plan"], fast_profile, tiny["contract"], tiny["onnx"], backend)
    assert rec["ran"] and set(rec["profiles"]) == {"prefill", "decode"}
    assert rec["ok"], json.dumps(rec["profiles"], indent=1)


def _inplace_contract(cache_len: int = 4096):
    src = resolve("tiny-llama")
    [spec] = pack_specs(src.config, 0, 0, "inplace", cache_len)
    return spec, io_contract(src.config, spec, 1, "float16")


def test_engine_check_inputs_for_an_inplace_buffer(fast_profile):
    """kv_io = "inplace": the mask spans the whole buffer and write_indices is the step's lastSum."""
    _, contract = _inplace_contract()
    shapes = build_trt.shapes_for(contract, fast_profile)
    [decode] = [sp for sp in fast_profile.shapes if sp.name == "decode"]
    inputs = build_trt.runtime_check._check_inputs(contract, decode, shapes["decode"], "float16", seed=0)
    assert inputs["write_indices"].tolist() == [302]
    assert tuple(inputs["past_key_in0"].shape) == (1, 2, 4096, 16)
    mask = inputs["attention_mask"]
    assert mask.shape == (1, 1, 1, 4096)
    assert mask[0, 0, 0, 302].item() == 0 and mask[0, 0, 0, 303].item() < -1e4


@pytest.mark.gpu
def test_inplace_engine_updates_its_buffer_and_matches_onnxruntime(tmp_path, backend, fast_profile):
    if not backend.can_run:
        pytest.skip(f"needs a CUDA GPU the backend can run engines on: {backend.why_not_run}")
    src = resolve("tiny-llama")
    spec, contract = _inplace_contract()
    export_pack(src, spec, "float16", 1, tmp_path / "decoder.onnx")
    profile = fast_profile.with_export(kv_io="inplace", cache_len=4096)
    build_trt.build_engine(tmp_path / "decoder.onnx", tmp_path / "decoder.plan", profile, contract, backend, None,
                           log=lambda *_: None)
    rec = build_trt.run_engine_check(tmp_path / "decoder.plan", profile, contract, tmp_path / "decoder.onnx", backend)
    assert rec["ran"] and rec["ok"], json.dumps(rec["profiles"], indent=1)


def test_the_parser_reads_the_weights_in_place(built, tiny):
    """The build hands the parser pointers into a memory map of the ONNX file, not copies."""
    import onnx
    record = built["record"]
    big = sum(len(t.raw_data) for t in onnx.load(tiny["onnx"]).graph.initializer if len(t.raw_data) >= 4096)
    assert record["weights_mapped_bytes"] == big > 0
    assert any("memory-mapped" in line for line in built["log"])


def test_weights_the_scan_cannot_place_are_read_by_the_parser(tiny, fast_profile, backend, tmp_path, monkeypatch,
                                                              built):
    """A scan that disagrees with the graph never reaches the parser: it reads the file itself,
    says so, and builds the same network."""
    import kvplan.trt.mapped_weights as mw
    monkeypatch.setattr(mw, "weights_free_model", lambda *a: (_ for _ in ()).throw(ValueError("scan failed")))
    lines: list[str] = []
    record = build_trt.build_engine(tiny["onnx"], tmp_path / "decoder.plan", fast_profile, tiny["contract"], backend,
                                    None, log=lines.append)
    assert record["weights_mapped_bytes"] == 0
    assert any("weights not mapped (ValueError: scan failed)" in line for line in lines)
    assert record["network"] == built["record"]["network"]
    assert record["plan_bytes"] == built["record"]["plan_bytes"]


def test_gpu_capabilities_come_from_the_driver_library_without_torch(monkeypatch):
    """Where neither nvidia-smi nor cuda-python exists, the driver API is asked (attributes 75/76:
    compute capability major/minor); a machine without libcuda says so without importing torch."""
    import ctypes
    import subprocess

    from kvplan.trt import backend as backend_mod

    class FakeDriver:
        def cuInit(self, flags):
            return 0

        def cuDeviceGetCount(self, ref):
            ref._obj.value = 2
            return 0

        def cuDeviceGet(self, ref, ordinal):
            ref._obj.value = ordinal
            return 0

        def cuDeviceGetAttribute(self, ref, attribute, device):
            ref._obj.value = {(75, 0): 8, (76, 0): 6, (75, 1): 12, (76, 1): 0}[attribute, device.value]
            return 0

    monkeypatch.setattr(backend_mod.shutil, "which", lambda name: None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)       # as if cuda-python were not installed
    monkeypatch.setattr(ctypes, "CDLL", lambda name: FakeDriver())
    assert backend_mod.visible_gpus() == (["8.6", "12.0"], "CUDA driver API")

    def no_driver(name):
        raise OSError(f"{name}: cannot open shared object file")
    monkeypatch.setattr(ctypes, "CDLL", no_driver)
    probe = "from kvplan.trt.backend import visible_gpus; import sys; print(visible_gpus(), 'torch' in sys.modules)"
    assert backend_mod.visible_gpus() == ([], "no CUDA GPU visible")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parent.parent).stdout
    assert out.strip().endswith("False")


def test_a_missing_data_file_is_reported_by_the_parser_not_by_the_mapping(tiny, fast_profile, backend, tmp_path):
    """Mapping fails on a data file that is not there; the build falls back to the parser, whose
    error names the file, instead of a traceback from the memory map."""
    import onnx
    model = onnx.load(tiny["onnx"])
    onnx.save(model, tmp_path / "ext.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    lines: list[str] = []
    with pytest.raises(BuildError) as err:
        build_trt.build_engine(tmp_path / "ext.onnx", tmp_path / "decoder.plan", fast_profile, tiny["contract"],
                               backend, None, log=lines.append)
    assert str(tmp_path / "ext.onnx") in str(err.value) and "parser" in str(err.value)
    assert any("weights not mapped (FileNotFoundError" in line for line in lines)
    assert not (tmp_path / "decoder.plan").exists()
