"""int4 weight-only quantization: the profile section, round to nearest, the graph form, the stage."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from kvplan import profiles
from kvplan.cli import build_main
from kvplan.decoder import DecoderStack, StackSpec
from kvplan.errors import ProfileError, QuantizeError
from kvplan.export import example_inputs
from kvplan.models import resolve
from kvplan.models.presets import tensor_shapes
from kvplan.profiles import Quantize
from kvplan.quantize.awq import quantize_awq
from kvplan.quantize.graph import quantize_graph
from kvplan.quantize.rtn import quantize_linear
from kvplan.quantize.stage import quantize_rtn
from kvplan.quantize.weights import Quantized, QuantLinear, dequantized_source
from kvplan.runtime.ort_session import session_options
from kvplan.surgery import fuse_file


def profile_text(**quantize) -> str:
    text = (profiles.PROFILES_DIR / "int4-awq.toml").read_text()
    for key, value in quantize.items():
        text, n = re.subn(rf"^{key} = .*$", f"{key} = {value}", text, flags=re.M)
        assert n == 1, key
    return text


def write_profile(tmp_path: Path, name: str = "int4", **quantize) -> str:
    path = tmp_path / f"{name}.toml"
    path.write_text(profile_text(**quantize))
    return str(path)


def run_ort(path: Path, inputs, options=None) -> list[np.ndarray]:
    sess = ort.InferenceSession(str(path), options or session_options(), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return sess.run(None, dict(zip(names, [t.numpy() for t in inputs])))


def torch_stack(source, dtype=torch.float16) -> DecoderStack:
    cfg = source.config
    stack = DecoderStack(cfg, StackSpec(0, cfg.num_layers, True), dtype)
    weights = source.read_tensors(list(tensor_shapes(cfg)))
    stack.load_state_dict({k: v.to(dtype) for k, v in weights.items()}, strict=False)
    return stack.to(dtype).eval()


@pytest.fixture(scope="module")
def tiny_rtn(export_tiny, tmp_path_factory):
    """tiny-llama exported in fp16, RTN-quantized (group 32) and rewritten to int4."""
    source = resolve("tiny-llama")
    [pack] = export_tiny("tiny-llama", "float16")
    quantized = quantize_rtn(source, Quantize(method="rtn", group_size=32), log=lambda _: None)
    out = tmp_path_factory.mktemp("int4") / "decoder.int4.onnx"
    quantize_graph(pack.path, out, quantized, source.read_tensors, range(source.config.num_layers))
    return source, quantized, pack.path, out


# --- profile -------------------------------------------------------------------------------

def test_shipped_full_precision_profiles_quantize_nothing():
    for name in ("fp16", "bf16", "fp32"):
        assert profiles.load(name).quantize == Quantize() and not profiles.load(name).quantize.enabled


def test_int4_awq_profile_is_awq_group_128_on_all_seven_linears_with_fp16_activations():
    p = profiles.load("int4-awq")
    assert (p.dtype, p.quantize.method, p.quantize.bits, p.quantize.group_size) == ("float16", "awq", 4, 128)
    assert len(p.quantize.linears) == 7


@pytest.mark.parametrize("field, value, message", [
    ("bits", "8", "quantize.bits: 8 bits are not supported"),
    ("group_size", "96", "quantize.group_size: must be one of 32, 64, 128"),
    ("method", '"gptq"', "quantize.method: unknown method 'gptq'"),
    ("linears", '["q_proj", "lm_head"]', "quantize.linears: unknown linear 'lm_head'"),
])
def test_bad_quantize_field_is_refused_naming_file_and_field(tmp_path, field, value, message):
    path = write_profile(tmp_path, **{field: value})
    with pytest.raises(ProfileError, match=re.escape(message)) as e:
        profiles.load(path)
    assert path in str(e.value)


def test_int4_profile_refuses_a_compute_capability_that_cannot_run_int4(tmp_path):
    path = tmp_path / "sm75.toml"
    path.write_text(profile_text().replace("compute_capabilities = []", 'compute_capabilities = ["7.5", "8.6"]'))
    with pytest.raises(ProfileError, match=r"engine.compute_capabilities: 7.5 cannot run int4"):
        profiles.load(str(path))


def test_group_size_that_does_not_divide_a_linear_is_refused_naming_the_tensor():
    with pytest.raises(QuantizeError, match=r"group_size 128 does not divide the input size 64 of tensor "
                                            r"'layers.0.self_attn.q_proj.weight'"):
        quantize_rtn(resolve("tiny-llama"), Quantize(method="rtn", group_size=128), log=lambda _: None)


# --- round to nearest ------------------------------------------------------------------------

def test_rtn_is_symmetric_per_group_with_scale_amax_over_7():
    w = torch.randn(48, 64)
    w[3, 5] = 9.0                                   # the amax of its group
    ql = quantize_linear("w", w, 32)
    assert ql.q.shape == (64, 48) and ql.scale.shape == (2, 48) and ql.q.dtype == torch.int8
    assert int(ql.q.min()) >= -8 and int(ql.q.max()) <= 7
    amax = w.t().reshape(2, 32, 48).abs().amax(1)
    torch.testing.assert_close(ql.scale, amax / 7)
    assert int(ql.q[5, 3]) == 7
    # Round to nearest: every weight within half a step of its dequantized value.
    err = (ql.dequantized() - w).abs()
    assert bool((err <= ql.scale.repeat_interleave(32, 0).t() / 2 + 1e-6).all())


# --- the graph form ------------------------------------------------------------------------

def test_int4_graph_uses_the_one_form_tensorrt_and_onnx_runtime_share(tiny_rtn):
    _, _, _, path = tiny_rtn
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    dqs = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert len(dqs) == 4 * 7
    for dq in dqs:
        assert len(dq.input) == 2                                 # no zero point
        w, scale = inits[dq.input[0]], inits[dq.input[1]]
        assert w.data_type == onnx.TensorProto.INT4 and scale.data_type == onnx.TensorProto.FLOAT16
        assert list(scale.dims) == [w.dims[0] // 32, w.dims[1]]
        assert {a.name: onnx.helper.get_attribute_value(a) for a in dq.attribute} == {"axis": 0, "block_size": 32}
        [consumer] = [n for n in model.graph.node if dq.output[0] in n.input]
        assert consumer.op_type == "MatMul" and list(consumer.input).index(dq.output[0]) == 1
        assert producers.get(consumer.input[0], None) is None or producers[consumer.input[0]].op_type != "DequantizeLinear"
    # No full-precision copy of a linear is left behind.
    scales = {dq.input[1] for dq in dqs}
    assert not [t.name for t in model.graph.initializer if len(t.dims) == 2 and t.name not in scales
                and t.data_type == onnx.TensorProto.FLOAT16]


def test_a_saved_quantization_loads_with_every_linear_and_replaced_tensor_as_saved(tiny_rtn, tmp_path):
    _, quantized, _, _ = tiny_rtn
    quantized.replaced["norm.weight"] = torch.linspace(0.5, 1.5, 64)
    try:
        quantized.save(tmp_path / "quantized.safetensors")
    finally:
        del quantized.replaced["norm.weight"]
    loaded = Quantized.load(tmp_path / "quantized.safetensors")
    assert sorted(loaded.linears) == sorted(quantized.linears) and list(loaded.replaced) == ["norm.weight"]
    for name, ql in quantized.linears.items():
        got = loaded.linears[name]
        assert torch.equal(got.q, ql.q) and torch.equal(got.scale, ql.scale) and got.group_size == ql.group_size
    assert torch.equal(loaded.replaced["norm.weight"], torch.linspace(0.5, 1.5, 64))
    assert "layers.0.nothing.weight" not in loaded.linears


def test_a_loaded_quantization_reads_its_tensors_when_asked_for_not_up_front(tiny_rtn, tmp_path):
    """Validation holds one for its whole run: its tensors stay in the file until looked up."""
    _, quantized, _, _ = tiny_rtn
    path = tmp_path / "quantized.safetensors"
    quantized.save(path)
    loaded = Quantized.load(path)
    name = next(iter(quantized.linears))
    doubled = Quantized({n: QuantLinear(ql.q, ql.scale * 2, ql.group_size) for n, ql in quantized.linears.items()})
    doubled.save(path)
    assert torch.equal(loaded.linears[name].scale, quantized.linears[name].scale * 2)
    path.unlink()                 # asking which tensors it has reads none
    assert name in loaded.linears and "layers.0.nothing.weight" not in loaded.linears


def test_the_dequantized_source_keeps_the_models_embedding_lm_head_and_tokenizer(tiny_rtn):
    """int4 covers the linears: what validation feeds (embeddings, tokenizer) is the model's own."""
    source, quantized, _, _ = tiny_rtn
    int4 = dequantized_source(source, quantized)
    assert int4.read_embedding is source.read_embedding and int4.embedding == source.embedding
    assert int4.read_lm is source.read_lm and int4.tokenizer is source.tokenizer


def test_int4_graph_in_onnx_runtime_matches_pytorch_on_the_same_dequantized_weights(tiny_rtn):
    source, quantized, fp_path, path = tiny_rtn
    cfg = source.config
    reference = torch_stack(dequantized_source(source, quantized))
    full = torch_stack(source)
    for n, last in ((5, 7), (1, 30), (12, 0)):
        inputs = example_inputs(cfg, StackSpec(0, cfg.num_layers, True), 1, torch.float16, n, last, seed=n)
        with torch.no_grad():
            want = [t.float().numpy() for t in reference(*inputs)]
            fp = full(*inputs)[0].float().numpy()
        got = run_ort(path, inputs)
        for g, w in zip(got, want):
            # fp16 rounding of a 4-layer stack: the same rounding level the fp16 profile allows.
            np.testing.assert_allclose(g.astype(np.float32), w, atol=1e-2, rtol=1e-2)
        # ... and the comparison can tell: the full-precision model is much further away.
        assert np.abs(got[0] - fp).mean() > 3 * np.abs(got[0] - want[0]).mean()


def test_onnx_runtime_default_int4_accuracy_level_is_coarser_than_level_0(tiny_rtn):
    source, quantized, _, path = tiny_rtn
    cfg = source.config
    inputs = example_inputs(cfg, StackSpec(0, cfg.num_layers, True), 1, torch.float16, 64, 4)
    with torch.no_grad():
        want = torch_stack(dequantized_source(source, quantized))(*inputs)[0].float().numpy()
    level0 = np.abs(run_ort(path, inputs)[0] - want).mean()
    default = np.abs(run_ort(path, inputs, ort.SessionOptions())[0] - want).mean()
    assert level0 < default


def test_surgery_keeps_every_int4_dequantize_and_fuses_norm_rope_attention_residuals(tiny_rtn, tmp_path):
    _, _, _, path = tiny_rtn
    report = fuse_file(path, tmp_path / "decoder.fused.onnx", ["rmsnorm", "rope", "attention", "residual2d"], log=None)
    assert (report["passes"]["rmsnorm"]["fused"], report["passes"]["rope"]["fused"],
            report["passes"]["attention"]["fused"], report["passes"]["residual2d"]["fused"]) == (9, 8, 4, 8)
    model = onnx.load(str(tmp_path / "decoder.fused.onnx"))
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["DequantizeLinear"] == 28 and ops["RMSNormalization"] == 9
    assert sum(t.data_type == onnx.TensorProto.INT4 for t in model.graph.initializer) == 28


def test_rewrite_refuses_a_graph_without_the_linear_and_writes_nothing(tiny_rtn, tmp_path):
    source, quantized, fp_path, _ = tiny_rtn
    def other_weights(names):                       # no initializer holds these values
        return {n: t + 1 for n, t in source.read_tensors(names).items()}
    with pytest.raises(QuantizeError, match=r"tensor 'layers.0.self_attn.q_proj.weight': initializer .* does not "
                                            r"hold the source's values"):
        quantize_graph(fp_path, tmp_path / "x.onnx", quantized, other_weights, range(source.config.num_layers))
    assert not list(tmp_path.iterdir())


# --- the stage -------------------------------------------------------------------------------

def build(out: Path, profile: str, model: str = "tiny-llama", *extra: str) -> dict:
    assert build_main(["--model", model, "--profile", profile, "--out", str(out), *extra]) == 0
    return json.loads((out / model / Path(profile).stem / "manifest.json").read_text())


def test_rewrite_reading_weights_from_the_file_writes_the_same_bytes_as_reading_them_up_front(
        tiny_rtn, tmp_path, monkeypatch):
    from kvplan.quantize import lazy_onnx
    source, quantized, src, _ = tiny_rtn
    monkeypatch.setattr(lazy_onnx, "LAZY_BYTES", 2 ** 40)        # every weight parsed when loaded
    quantize_graph(src, tmp_path / "eager.onnx", quantized, source.read_tensors, range(source.config.num_layers))
    monkeypatch.setattr(lazy_onnx, "LAZY_BYTES", 0)              # every weight left in the file
    quantize_graph(src, tmp_path / "lazy.onnx", quantized, source.read_tensors, range(source.config.num_layers))
    assert (tmp_path / "lazy.onnx").read_bytes() == (tmp_path / "eager.onnx").read_bytes()


def test_lazily_loaded_graph_holds_no_weight_values_until_one_is_read(tiny_rtn, monkeypatch):
    from kvplan.quantize import lazy_onnx
    _, _, src, _ = tiny_rtn
    monkeypatch.setattr(lazy_onnx, "LAZY_BYTES", 1024)
    model = lazy_onnx.load_lazy(src)
    full = onnx.load(str(src))
    big = {t.name for t in full.graph.initializer if t.ByteSize() >= 1024}
    lazy = {n for n, v in model.graph.initializers.items() if isinstance(v.const_value, lazy_onnx.SourceTensor)}
    assert big and lazy == big
    # Each reads back its own values, exactly.
    for t in full.graph.initializer:
        if t.name in big:
            np.testing.assert_array_equal(model.graph.initializers[t.name].const_value.numpy(),
                                          numpy_helper.to_array(t))


def test_rtn_profile_builds_an_int4_tensorrt_rtx_plan_on_cpu(tmp_path):
    pytest.importorskip("tensorrt_rtx")
    manifest = build(tmp_path, write_profile(tmp_path, method='"rtn"', group_size="32"))
    assert list(manifest["stages"]) == ["export", "quantize", "surgery", "embed_head", "engines"]
    quant = manifest["stages"]["quantize"]
    assert [a["path"] for a in quant["artifacts"]] == ["decoder.int4.onnx", "quantized.safetensors"]
    assert quant["artifacts"][0]["linears"] == 28
    ops = manifest["stages"]["surgery"]["artifacts"][0]["report"]["ops_after"]
    assert ops["DequantizeLinear"] == 28 and ops["Attention"] == 4
    [plan] = [a for a in manifest["stages"]["engines"]["artifacts"] if "pack" in a]
    assert plan["bytes"] > 0


def test_quantize_stage_is_skipped_when_unchanged_and_rebuilt_when_its_group_size_changes(tmp_path, capsys):
    path = write_profile(tmp_path, method='"rtn"', group_size="32")
    build(tmp_path, path, "tiny-llama", "--stop-after", "quantize")
    capsys.readouterr()
    build(tmp_path, path, "tiny-llama", "--stop-after", "quantize")
    assert "[quantize] up to date" in capsys.readouterr().out
    Path(path).write_text(profile_text(method='"rtn"', group_size="64"))
    manifest = build(tmp_path, path, "tiny-llama", "--stop-after", "quantize")
    assert "[export] up to date" in capsys.readouterr().out
    assert manifest["stages"]["quantize"]["group_size"] == 64


# --- AWQ -------------------------------------------------------------------------------------

def relative_error(source, quantized, seed: int = 123) -> float:
    """|hidden_out(int4 weights) - hidden_out(full precision)| / |hidden_out(full precision)|, fp32,
    on inputs the calibration never saw."""
    cfg = source.config
    inputs = example_inputs(cfg, StackSpec(0, cfg.num_layers, True), 1, torch.float32, 64, 0, seed=seed)
    with torch.no_grad():
        ref = torch_stack(source, torch.float32)(*inputs)[0]
        got = torch_stack(dequantized_source(source, quantized), torch.float32)(*inputs)[0]
    return float((got - ref).norm() / ref.norm())


@pytest.fixture(scope="module")
def outliers_awq():
    source = resolve("tiny-llama-outliers")
    return source, quantize_awq(source, Quantize(method="awq", group_size=32), log=lambda _: None)


def test_awq_beats_rtn_on_the_outlier_preset(outliers_awq):
    source, awq = outliers_awq
    rtn = quantize_rtn(source, Quantize(method="rtn", group_size=32), log=lambda _: None)
    assert relative_error(source, awq) < 0.7 * relative_error(source, rtn)


def test_awq_searches_twenty_alphas_and_folds_into_the_norms(outliers_awq):
    from kvplan.quantize.awq import ALPHAS
    source, awq = outliers_awq
    assert len(ALPHAS) == 20 and ALPHAS[0] == 0 and ALPHAS[-1] < 1
    # No GQA here, so v -> o is a scaling group as well.
    assert set(awq.record["alpha"]["0"]) == {"input_layernorm", "v_proj", "post_attention_layernorm", "up_proj"}
    assert {n for n in awq.replaced} == {f"layers.{i}.{norm}.weight" for i in range(2)
                                         for norm in ("input_layernorm", "post_attention_layernorm")}


def test_awq_searches_in_row_blocks_compute_the_whole_weights_losses(monkeypatch):
    from kvplan.quantize import awq
    g = torch.Generator().manual_seed(0)
    x = torch.randn(48, 64, generator=g) * torch.linspace(0.1, 4, 64)
    weights = [0.02 * torch.randn(96, 64, generator=g), 0.02 * torch.randn(40, 64, generator=g)]
    monkeypatch.setattr(awq, "ROWS", 10 ** 6)
    s_whole, whole = awq.search_scales(x, weights, [True, True], 32)
    clip_whole = awq.search_clip(x, weights[0], 32)
    monkeypatch.setattr(awq, "ROWS", 7)
    s_blocks, blocks = awq.search_scales(x, weights, [True, True], 32)
    np.testing.assert_allclose(blocks, whole, rtol=1e-5)
    torch.testing.assert_close(s_blocks, s_whole)
    torch.testing.assert_close(awq.search_clip(x, weights[0], 32), clip_whole)


def test_awq_leaves_torchs_thread_count_as_it_found_it():
    from kvplan.quantize import awq
    before = torch.get_num_threads()
    awq.quantize_awq(resolve("tiny-llama-outliers"), Quantize(method="awq", group_size=32, samples=1, tokens=8),
                     log=lambda _: None)
    assert torch.get_num_threads() == before


def test_awq_with_gqa_shares_no_scale_between_v_and_o():
    from kvplan.quantize.awq import scaling_groups
    groups = dict(scaling_groups(resolve("tiny-llama").config, profiles.LINEARS))
    assert "v_proj" not in groups and groups["up_proj"] == ["down_proj"]


@pytest.mark.parametrize("preset", ["tiny-llama-outliers", "tiny-gemma2", "tiny-qwen3", "tiny-qwen2", "tiny-phi3"])
def test_awq_scale_folding_is_exact_in_full_precision(preset):
    from kvplan.decoder import DecoderLayer
    from kvplan.quantize.awq import _fold, scaling_groups
    source = resolve(preset)
    cfg = source.config
    layer = DecoderLayer(cfg)
    layer.load_state_dict({n.split(".", 2)[2]: t for n, t in source.read_tensors(
        [n for n in tensor_shapes(cfg) if n.startswith("layers.0.")]).items()})
    x = torch.randn(2, 5, cfg.hidden_size)
    mask = torch.zeros(2, 1, 5, 5)
    cos, sin = torch.ones(2, 1, 5, cfg.rotary_dim), torch.zeros(2, 1, 5, cfg.rotary_dim)
    past = [torch.zeros(2, cfg.num_kv_heads, 0, cfg.head_dim)] * 2
    with torch.no_grad():
        before = layer(x, mask, cos, sin, *past)[0]
        for i, (prev, group) in enumerate(scaling_groups(cfg, profiles.LINEARS)):
            _fold(layer, prev, group, torch.rand(cfg.hidden_size if group != ["down_proj"] else
                                                 cfg.intermediate_size, generator=torch.Generator().manual_seed(i)) + 0.5)
        after = layer(x, mask, cos, sin, *past)[0]
    torch.testing.assert_close(after, before, atol=1e-5, rtol=1e-5)


def test_awq_int4_graph_matches_pytorch_on_its_dequantized_weights(outliers_awq, tmp_path):
    source, awq = outliers_awq
    cfg = source.config
    spec = StackSpec(0, cfg.num_layers, True)
    from kvplan.export import export_pack
    export_pack(source, spec, "float16", 1, tmp_path / "decoder.onnx")
    quantize_graph(tmp_path / "decoder.onnx", tmp_path / "decoder.int4.onnx", awq, source.read_tensors,
                   range(cfg.num_layers))
    inputs = example_inputs(cfg, spec, 1, torch.float16, 7, 9, seed=4)
    with torch.no_grad():
        want = torch_stack(dequantized_source(source, awq))(*inputs)[0].float().numpy()
    got = run_ort(tmp_path / "decoder.int4.onnx", inputs)[0]
    np.testing.assert_allclose(got.astype(np.float32), want, atol=2e-2, rtol=1e-2)


# --- calibration -----------------------------------------------------------------------------

def test_calibration_file_of_the_wrong_hidden_size_is_refused_naming_file_and_tensor(tmp_path):
    from safetensors.torch import save_file

    from kvplan.quantize.calibration import calibration_hidden
    path = tmp_path / "calib.safetensors"
    save_file({"hidden_states": torch.randn(2, 8, 32)}, str(path))
    with pytest.raises(QuantizeError, match=rf"{re.escape(str(path))}: tensor 'hidden_states' is .* \[2, 8, 32\]; "
                                            r"expected float \[samples, tokens, 64\]"):
        calibration_hidden(resolve("tiny-llama"), Quantize(method="awq", calibration=str(path)))


def test_calibration_token_ids_are_embedded_with_the_models_own_embedding(tmp_path):
    from safetensors.torch import save_file

    from kvplan.quantize.calibration import calibration_hidden
    source = resolve("tiny-llama")
    ids = torch.randint(0, 256, (3, 10))
    path = tmp_path / "ids.safetensors"
    save_file({"input_ids": ids}, str(path))
    hidden = calibration_hidden(source, Quantize(method="awq", calibration=str(path), samples=2, tokens=6))
    torch.testing.assert_close(hidden, source.read_lm()["embed_tokens.weight"][ids[:2, :6]])


def test_changed_calibration_file_requantizes_and_an_unchanged_one_does_not(tmp_path, capsys):
    from safetensors.torch import save_file
    calib = tmp_path / "calib.safetensors"
    save_file({"hidden_states": torch.randn(2, 16, 64)}, str(calib))
    path = write_profile(tmp_path, group_size="32", calibration=f'"{calib}"', samples="2", tokens="16")
    first = build(tmp_path, path, "tiny-llama", "--stop-after", "quantize")["stages"]["quantize"]
    capsys.readouterr()
    build(tmp_path, path, "tiny-llama", "--stop-after", "quantize")
    assert "[quantize] up to date" in capsys.readouterr().out
    save_file({"hidden_states": torch.randn(2, 16, 64) * 3}, str(calib))
    second = build(tmp_path, path, "tiny-llama", "--stop-after", "quantize")["stages"]["quantize"]
    assert "[quantize] building" in capsys.readouterr().out
    assert first["inputs_digest"] != second["inputs_digest"]


# --- validation ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def validated_rtn(tmp_path_factory):
    """tiny-llama built with RTN int4 (group 32) and validated at the opt points: (target, record, stdout)."""
    pytest.importorskip("tensorrt_rtx")
    tmp_path = tmp_path_factory.mktemp("validated-int4")
    path = write_profile(tmp_path, method='"rtn"', group_size="32")
    build(tmp_path, path)
    from kvplan.cli import validate_main
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        code = validate_main(["--model", "tiny-llama", "--profile", path, "--out", str(tmp_path), "--points",
                              "opt", "--steps", "4"])
    assert code == 0, buf.getvalue()
    target = tmp_path / "tiny-llama" / "int4"
    return target, json.loads((target / "manifest.json").read_text())["validation"], buf.getvalue()


def test_validation_of_an_int4_target_checks_faithfulness_and_reports_quality(validated_rtn):
    _, record, out = validated_rtn
    assert record["status"] == "pass"
    # The compared graph is the int4 one, against transformers on its dequantized weights.
    assert "decoder.int4.onnx" in record["artifacts"]
    assert record["runners"]["onnxrt-export"]["ran"]
    quality = record["quality"]
    assert quality["method"] == "rtn" and {p["point"] for p in quality["points"]} >= {"decode/opt N=1 lastSum=302"}
    assert all(0 < p["hidden_out_rel_error"] < 0.25 for p in quality["points"])
    assert "quality (rtn int4 against the full-precision model" in out


def test_printed_onnx_runtime_recheck_of_an_int4_graph_runs_unfused_and_passes(validated_rtn):
    # Polygraphy cannot set the int4 accuracy level; the printed command keeps ONNX Runtime from
    # fusing the int4 MatMuls at all (no int8 activations), and passes at the profile's tolerances.
    target, record, _ = validated_rtn
    cmds = [c for c in record["recheck"] if "--onnxrt" in c]
    assert cmds and all("decoder.int4" in c and "--graph-optimization-level ORT_ENABLE_BASIC" in c for c in cmds)
    for cmd in cmds:                  # one per optimization profile
        done = subprocess.run(shlex.split(cmd), cwd=target, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        assert "PASSED" in done.stdout + done.stderr
