"""The GPU paths, as far as a CPU host checks them: version gates of the TensorRT releases
kvplan supports, backend choice, plan deserialization flags, in-place output binding, and the
runtime check's CUDA path (which must not depend on the torch build)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from kvplan import profiles
from kvplan.decoder import pack_specs
from kvplan.errors import BackendError
from kvplan.export.exporter import io_contract
from kvplan.models import resolve
from kvplan.trt import backend as backend_mod
from kvplan.trt import network, plan_io, runtime_check
from kvplan.trt.errors import BuildError

# --------------------------------------------------------------------------- version gates

@pytest.mark.parametrize("version, lacks", [
    ("10.8.0.43", ["Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter", "get_aliased_input_tensor"]),
    ("10.13.3.9", ["Attention", "RMSNormalization", "RotaryEmbedding", "TensorScatter", "get_aliased_input_tensor"]),
    ("10.14.1.48", ["RMSNormalization", "RotaryEmbedding", "TensorScatter", "get_aliased_input_tensor"]),
    ("10.15.0.27", []),
    ("11.0.0b1", []),
])
def test_full_tensorrt_versions_name_what_they_lack(version, lacks):
    got = backend_mod.lacking("tensorrt", version)
    assert len(got) == len(lacks)
    assert all(word in line for word, line in zip(lacks, got))


def test_tensorrt_rtx_and_unparsable_versions_are_not_gated():
    assert backend_mod.lacking("tensorrt-rtx", "1.7.1.116") == ()
    assert backend_mod.lacking("tensorrt", "unknown") == ()


def test_the_attention_flag_is_skipped_where_tensorrt_has_no_attention_layer():
    """TensorRT 10.8-10.13 has no LayerType.ATTENTION_INPUT: every build used to raise AttributeError."""
    old_trt = SimpleNamespace(LayerType=SimpleNamespace(MATRIX_MULTIPLY="MATRIX_MULTIPLY"))
    layer = SimpleNamespace(type="MATRIX_MULTIPLY")
    net = SimpleNamespace(num_layers=2, get_layer=lambda i: layer)
    assert network.allow_decomposed_attention(old_trt, net) == 0


def test_parser_failures_name_what_an_old_tensorrt_lacks(tmp_path):
    class Parser:
        num_errors = 0

        def parse_from_file(self, path):
            return False
    old = backend_mod.Backend(name="tensorrt", version="10.13.0.35", can_run=True, why_not_run="",
                              lacks=backend_mod.lacking("tensorrt", "10.13.0.35"),
                              loaded=SimpleNamespace(NetworkDefinitionCreationFlag=None))
    trt = SimpleNamespace(Builder=lambda logger: SimpleNamespace(create_network=lambda flag: object()),
                          OnnxParser=lambda net, logger: Parser())
    (tmp_path / "g.onnx").write_bytes(b"")
    with pytest.raises(BuildError) as err:
        network.parse(trt, old, tmp_path / "g.onnx", SimpleNamespace(errors=[]))
    assert "tensorrt 10.13.0.35 lacks: Attention" in str(err.value) and "RMSNormalization" in str(err.value)


# --------------------------------------------------------------------------- backend choice

def _fake_probe(have: dict):
    def probe(name):
        if name not in have:
            raise BackendError(f"{name} is not importable")
        return have[name]
    return probe


@pytest.mark.parametrize("gpus, have, expected", [
    # No GPU: full TensorRT's builder cannot run, TensorRT-RTX's can.
    (([], "no CUDA GPU visible"), {"tensorrt": "10.15.0", "tensorrt-rtx": "1.7.1"}, "tensorrt-rtx"),
    # A GPU and a complete full TensorRT: it runs engines TensorRT-RTX may not (Hopper).
    ((["9.0"], "nvidia-smi"), {"tensorrt": "10.15.0", "tensorrt-rtx": "1.7.1"}, "tensorrt"),
    # A GPU, but a full TensorRT without the fused layers: TensorRT-RTX builds the default graphs.
    ((["9.0"], "nvidia-smi"), {"tensorrt": "10.13.0", "tensorrt-rtx": "1.7.1"}, "tensorrt-rtx"),
    ((["9.0"], "nvidia-smi"), {"tensorrt": "10.13.0"}, "tensorrt"),
])
def test_auto_takes_a_backend_that_can_build_here(monkeypatch, gpus, have, expected):
    monkeypatch.setattr(backend_mod, "visible_gpus", lambda: gpus)
    monkeypatch.setattr(backend_mod, "_probe", _fake_probe(have))
    assert backend_mod.select_backend("auto").name == expected


def test_auto_with_only_full_tensorrt_and_no_gpu_says_what_to_install(monkeypatch):
    monkeypatch.setattr(backend_mod, "visible_gpus", lambda: ([], "no CUDA GPU visible"))
    monkeypatch.setattr(backend_mod, "_probe", _fake_probe({"tensorrt": "10.15.0"}))
    with pytest.raises(BackendError, match="builder needs a CUDA GPU.*tensorrt-rtx-cu13"):
        backend_mod.select_backend("auto")


def test_a_backend_that_is_not_installed_is_named_with_what_to_install(monkeypatch):
    monkeypatch.setitem(backend_mod.MODULES, "tensorrt", "kvplan_no_such_tensorrt")
    with pytest.raises(BackendError, match="'tensorrt' is not importable.*NVIDIA's package index"):
        backend_mod.select_backend("tensorrt")


def test_a_named_full_tensorrt_without_gpu_refuses_to_build(monkeypatch, tmp_path):
    from kvplan.trt import build_engine
    monkeypatch.setattr(backend_mod, "visible_gpus", lambda: ([], "no CUDA GPU visible"))
    monkeypatch.setattr(backend_mod, "_probe", _fake_probe({"tensorrt": "10.15.0"}))
    backend = backend_mod.select_backend("tensorrt")
    assert not backend.can_build
    with pytest.raises(BuildError, match="builder needs a CUDA GPU"):
        build_engine(tmp_path / "decoder.onnx", tmp_path / "decoder.plan", profiles.load("fp16"), {}, backend, None)


# --------------------------------------------------------------------------- plans

class _Runtime:
    engine_host_code_allowed = False      # as trt.Runtime: off unless set

    def __init__(self, logger):
        self.seen = None

    def deserialize_cuda_engine(self, data):
        self.seen = self.engine_host_code_allowed
        return "engine"


@pytest.mark.parametrize("options, allowed", [({"version_compatible": True}, True),
                                              ({"version_compatible": False}, False), (None, False)])
def test_version_compatible_plans_are_deserialized_with_host_code_allowed(options, allowed):
    trt = SimpleNamespace(Runtime=_Runtime)
    runtime, engine = plan_io.deserialize(trt, SimpleNamespace(errors=[]), b"plan", "x: ",
                                          plan_io.host_code_allowed(options))
    assert engine == "engine" and runtime.seen is allowed


def test_inspect_reads_the_version_compatible_flag_from_the_manifest(tmp_path):
    from kvplan.manifest import SCHEMA, write_json_atomic
    from kvplan.trt import inspection
    write_json_atomic(tmp_path / "manifest.json", {"schema": SCHEMA, "stages": {"engines": {"artifacts": [
        {"path": "decoder.plan", "build": {"options": {"version_compatible": True}}}]}}})
    assert plan_io.host_code_allowed(inspection._build_record(tmp_path / "decoder.plan").get("options"))
    assert inspection._build_record(tmp_path / "other.plan") == {}


# --------------------------------------------------------------------------- in-place binding

def _contract(kv_io: str):
    src = resolve("tiny-llama")
    [spec] = pack_specs(src.config, 0, 0, kv_io, 64 if kv_io == "inplace" else 0)
    return io_contract(src.config, spec, 1, "float16")


class _Engine:
    def __init__(self, aliases: dict):
        self.aliases = aliases

    def get_aliased_input_tensor(self, name):
        return self.aliases.get(name)


def test_in_place_outputs_are_bound_where_the_engine_says():
    engine = _Engine({"past_key0": "past_key_in0"})
    assert runtime_check.aliased_input(engine, "past_key0", _contract("inplace"), "p.plan") == "past_key_in0"
    assert runtime_check.aliased_input(engine, "hidden_out", _contract("inplace"), "p.plan") is None


def test_an_in_place_output_the_engine_does_not_alias_fails_loudly():
    """No name-based fallback: binding past_key1 to past_key_in1 when the engine says they are not
    aliased would hide a missing KV-cache update layer."""
    with pytest.raises(BuildError, match="past_key1 aliases no input.*KV-cache update layer"):
        runtime_check.aliased_input(_Engine({}), "past_key1", _contract("inplace"), "p.plan")


def test_in_place_plans_need_the_alias_query():
    with pytest.raises(BuildError, match="get_aliased_input_tensor"):
        runtime_check.aliased_input(object(), "past_key0", _contract("inplace"), "p.plan")
    assert runtime_check.aliased_input(object(), "past_key0", _contract("concat"), "p.plan") is None


# --------------------------------------------------------------------------- the runtime check's CUDA path

def test_runtime_check_without_a_cuda_runtime_reports_not_run(monkeypatch, tmp_path):
    """A backend that says it can run, on a host whose CUDA runtime gives no stream (this one):
    "not run" with the CUDA runtime's reason, never a torch.cuda error or a deserialization attempt."""
    import torch

    def no_torch_cuda(*a, **k):
        raise AssertionError("the runtime check used torch.cuda")
    monkeypatch.setattr(torch.cuda, "Stream", no_torch_cuda)
    import polygraphy.cuda as pcuda
    try:
        pcuda.Stream().free()
        pytest.skip("this host has a working CUDA runtime")
    except Exception:
        pass
    backend = backend_mod.Backend(name="tensorrt-rtx", version="1.7", can_run=True, why_not_run="")
    profile = profiles.load("fp16").with_engine(optimization_level=0)
    rec = runtime_check.run_engine_check(tmp_path / "missing.plan", profile, _contract("concat"),
                                         tmp_path / "missing.onnx", backend, log=lambda *_: None)
    assert rec["ran"] is False and rec["why"].startswith("no CUDA stream from the CUDA runtime")


# --------------------------------------------------------------------------- weight copies

def test_extra_memory_target_is_set_on_the_profiles_after_the_first_and_recorded(tmp_path):
    """A real TensorRT-RTX build of tiny-llama with the hint; the record says it was set."""
    from kvplan.export.exporter import export_pack
    from kvplan.trt import build_engine
    try:
        backend = backend_mod.select_backend("tensorrt-rtx")
    except BackendError as e:
        pytest.skip(str(e))
    src = resolve("tiny-llama")
    [spec] = pack_specs(src.config, 0, 0)
    export_pack(src, spec, "float16", 1, tmp_path / "decoder.onnx")
    profile = profiles.load("fp16").with_engine(optimization_level=0)
    record = build_engine(tmp_path / "decoder.onnx", tmp_path / "decoder.plan", profile,
                          io_contract(src.config, spec, 1, "float16"), backend, None, log=lambda *_: None,
                          extra_memory_target=0.0)
    assert record["options"]["extra_memory_target"] == 0.0 and (tmp_path / "decoder.plan").is_file()


# --------------------------------------------------------------------------- in-place re-check

IN_PLACE_PROFILE = """description = "in-place engine, tiny"
[export]
dtype = "float16"
kv_io = "inplace"
[surgery]
passes = []
[engine]
optimization_level = 0
[[engine.shapes]]
name = "prefill"
N = [1, 4, 8]
lastSum = [0, 0, 8]
[[engine.shapes]]
name = "decode"
N = [1, 1, 1]
lastSum = [1, 8, 15]
[validate]
atol = 5e-2
rtol = 2e-2
"""


@pytest.mark.slow  # a full in-place build and validation; in-place validation stays in test_validate
def test_validation_of_an_in_place_engine_prints_its_polygraphy_recheck(tmp_path, capsys):
    """Polygraphy's TensorRT runner binds in-place outputs (>= 0.50.3): the saved inputs and
    outputs re-check the engine with `polygraphy run` on a GPU host, one line per profile."""
    from kvplan.cli import build_main, validate_main
    from kvplan.manifest import load_manifest
    try:
        backend_mod.select_backend("auto")
    except BackendError as e:
        pytest.skip(str(e))
    (tmp_path / "inplace.toml").write_text(IN_PLACE_PROFILE)
    out = tmp_path / "e"
    args = ["--model", "tiny-llama", "--profile", str(tmp_path / "inplace.toml"), "--out", str(out)]
    assert build_main(args) == 0
    rc = validate_main(args + ["--points", "opt", "--no-task"])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    recheck = load_manifest(out / "tiny-llama" / "inplace")["validation"]["recheck"]
    engine_lines = [c for c in recheck if "--model-type engine" in c]
    assert [("--optimization-profile 0" in c, "--optimization-profile 1" in c) for c in engine_lines] == \
        [(True, False), (False, True)]
    assert all(c in printed for c in engine_lines)
