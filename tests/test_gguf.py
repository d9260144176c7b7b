"""GGUF files as a model source, and their int4 blocks imported exactly.

The tiny files are written here with the gguf package's writer, from the format's documentation:
llama.cpp's metadata keys and tensor names, its q/k row permutation for architecture llama
(convert_hf_to_gguf.py's ``permute``), Q4_0/Q4_1/Q8_0 blocks by ``gguf.quants.quantize`` and
Q4_K blocks packed by this file from the documented ``block_q4_K`` layout. The references are
independent of kvplan's reading: transformers' own GGUF loader (``from_pretrained(gguf_file=)``)
and ``gguf.quants.dequantize``.
"""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import onnx
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as Q

from kvplan.cli import build_main
from kvplan.decoder import pack_specs
from kvplan.errors import ModelError
from kvplan.export.exporter import causal_mask, export_pack
from kvplan.models import resolve
from kvplan.quantize import gguf_blocks
from kvplan.quantize.settings import Quantize
from kvplan.validate.onnx_stack import OnnxStack, Pack
from kvplan.validate.reference import HFReference

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, VOCAB = 256, 512, 4, 2, 2, 64
HEAD_DIM = HIDDEN // HEADS
# One linear of each kind of storage: the int4 block types, a non-int4 block type, a float type.
LINEAR_TYPES = {"attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q8_0, "attn_output": Q.F16,
                "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_1, "ffn_down": Q.Q4_K}
INT4 = {"attn_q", "attn_k", "ffn_gate", "ffn_up", "ffn_down"}
# Qwen3's and Gemma 2's heads are wider than hidden / heads (as in their models: 128, 256), which
# attention.key_length says. (transformers' GGUF loader reads neither key_length for Qwen3 nor Gemma 2's
# soft-caps and window: the values here are its config classes' defaults, as in Qwen3 and Gemma-2-2B.)
HEAD_DIMS = {"qwen3": 128, "gemma2": 256}


def shapes(head_dim: int = HEAD_DIM) -> dict[str, tuple[int, int]]:
    return {"attn_q": (HEADS * head_dim, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
            "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HEADS * head_dim),
            "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}


# Phi-3's GGUF keeps the checkpoint's fused projections: attn_qkv (q, k, v rows) and ffn_up (gate, up rows).
PHI3_SHAPES = {"attn_qkv": ((HEADS + 2 * KV_HEADS) * HEAD_DIM, HIDDEN), "attn_output": (HIDDEN, HEADS * HEAD_DIM),
               "ffn_up": (2 * INTER, HIDDEN), "ffn_down": (HIDDEN, INTER)}
PHI3_TYPES = {"attn_qkv": Q.Q4_1, "ffn_up": Q.Q4_K}


SHAPES = shapes()


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: the rows of q/k as llama.cpp's rotary wants them."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q4_k_bytes(rng: np.random.Generator, rows: int, cols: int) -> np.ndarray:
    """Random Q4_K blocks [rows, cols / 256 * 144], packed from ggml-common.h's block_q4_K: fp16 d, fp16
    dmin, 12 bytes of 6-bit scales/mins (the first four of each in the low 6 bits of bytes 0-3 / 4-7,
    the last four's low nibbles in bytes 8-11 and their top 2 bits in the top bits of bytes 0-7), then
    128 bytes of nibbles (chunk c of 32 bytes: sub-block 2c low, 2c + 1 high)."""
    n = rows * cols // 256
    d = rng.uniform(1e-4, 3e-4, n).astype(np.float16)
    dmin = rng.uniform(1e-4, 3e-4, n).astype(np.float16)
    sc = rng.integers(0, 64, (n, 8))
    mn = rng.integers(0, 64, (n, 8))
    sc[0, :2], mn[0, :2] = (0, 63), (63, 0)                  # the 6-bit extremes
    q = rng.integers(0, 16, (n, 8, 32))
    scales = np.zeros((n, 12), np.uint8)
    for j in range(4):
        scales[:, j] = sc[:, j] | ((sc[:, j + 4] >> 4) << 6)
        scales[:, j + 4] = mn[:, j] | ((mn[:, j + 4] >> 4) << 6)
        scales[:, j + 8] = (sc[:, j + 4] & 0xF) | ((mn[:, j + 4] & 0xF) << 4)
    qs = np.zeros((n, 4, 32), np.uint8)
    for c in range(4):
        qs[:, c] = q[:, 2 * c] | (q[:, 2 * c + 1] << 4)
    blocks = np.concatenate([d.view(np.uint8).reshape(n, 2), dmin.view(np.uint8).reshape(n, 2), scales,
                             qs.reshape(n, 128)], axis=1)
    return blocks.reshape(rows, cols // 256 * 144)


def add_tensor(w: gguf.GGUFWriter, name: str, values: np.ndarray, kind) -> None:
    if kind in (Q.F32, Q.F16):
        w.add_tensor(name, values.astype(np.float32 if kind == Q.F32 else np.float16))
    else:
        blocks = gguf.quants.quantize(values.astype(np.float32), kind)
        w.add_tensor(name, blocks, raw_shape=blocks.shape, raw_dtype=kind)


def write_gguf(path: Path, arch: str = "llama", types: dict | None = None, seed: int = 0, tied: bool = True,
               extra=None) -> Path:
    """A tiny ``arch`` decoder as llama.cpp writes it. ``extra(writer)`` adds more."""
    types = {**LINEAR_TYPES, **(PHI3_TYPES if arch == "phi3" else {}), **(types or {})}
    head_dim = HEAD_DIMS.get(arch, HEAD_DIM)
    rng = np.random.default_rng(seed)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(LAYERS)
    w.add_context_length(4096)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    if head_dim != HEAD_DIM:
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma2":
        w.add_float32("gemma2.attn_logit_softcapping", 50.0)
        w.add_float32("gemma2.final_logit_softcapping", 30.0)
        w.add_sliding_window(4096)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(VOCAB)
    w.add_pad_token_id(0)          # (Phi3Config's default, 32000, is outside this vocabulary)
    add_tensor(w, "token_embd.weight", rng.normal(0, 0.5, (VOCAB, HIDDEN)), Q.F16)
    add_tensor(w, "output_norm.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), Q.F32)
    if not tied:
        add_tensor(w, "output.weight", rng.normal(0, 0.5, (VOCAB, HIDDEN)), Q.Q8_0)
    for i in range(LAYERS):
        norms = ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm") if arch == "gemma2" else \
            ("attn_norm", "ffn_norm")
        for norm in norms:
            add_tensor(w, f"blk.{i}.{norm}.weight", 1 + 0.1 * rng.standard_normal(HIDDEN), Q.F32)
        for name, (rows, cols) in (PHI3_SHAPES if arch == "phi3" else shapes(head_dim)).items():
            kind = types[name]
            if kind == Q.Q4_K:
                blocks = q4_k_bytes(rng, rows, cols)
                w.add_tensor(f"blk.{i}.{name}.weight", blocks, raw_shape=blocks.shape, raw_dtype=Q.Q4_K)
                continue
            values = rng.normal(0, 0.06, (rows, cols))
            if arch == "llama" and name in ("attn_q", "attn_k"):
                values = llama_cpp_permute(values, HEADS if name == "attn_q" else KV_HEADS)
            add_tensor(w, f"blk.{i}.{name}.weight", values, kind)
        if arch == "qwen2":
            for name in ("attn_q", "attn_k", "attn_v"):
                add_tensor(w, f"blk.{i}.{name}.bias", rng.normal(0, 0.1, SHAPES[name][0]), Q.F32)
        if arch == "qwen3":
            for name in ("attn_q_norm", "attn_k_norm"):
                add_tensor(w, f"blk.{i}.{name}.weight", 1 + 0.1 * rng.standard_normal(head_dim), Q.F32)
    if extra:
        extra(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_model(path: Path):
    """transformers' own GGUF loading of the file: the independent reference."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


def run_both(graph: Path, source, model, dtype=torch.float32, steps=((6, 0), (1, 6))):
    """(kvplan's graph in ONNX Runtime, transformers' decoder) outputs as float32, step by step on one
    cache; the graph is fed ``dtype``."""
    spec = pack_specs(source.config, 0)[0]
    stack = OnnxStack([Pack(spec, graph)])
    cache = transformers.DynamicCache()
    past = [torch.zeros(1, KV_HEADS, 0, source.config.head_dim, dtype=dtype).numpy() for _ in range(2 * LAYERS)]
    g = torch.Generator().manual_seed(0)
    results = []
    for n, last in steps:
        hidden = torch.randn(1, n, HIDDEN, generator=g) * 0.5
        pos = torch.arange(last, last + n)[None]
        got, past = stack.step(hidden.to(dtype).numpy(), causal_mask(1, n, last, dtype).numpy(), pos.numpy(), past)
        with torch.no_grad():
            want = model.model(inputs_embeds=hidden, position_ids=pos, past_key_values=cache, use_cache=True)
        results.append((got.astype(np.float32), [p.astype(np.float32) for p in past], want.last_hidden_state.numpy(),
                        [t.numpy() for t in HFReference.cache_tensors(cache, LAYERS)]))
    return results


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3", "gemma2", "phi3"])
def test_a_gguf_exports_the_graph_transformers_computes_from_the_same_file(tmp_path, arch):
    path = write_gguf(tmp_path / f"tiny-{arch}.gguf", arch)
    source = resolve(str(path))
    assert (source.kind, source.config.family, source.config.num_layers) == ("gguf", arch, LAYERS)
    assert source.config.qkv_bias == (arch == "qwen2") and source.config.qk_norm == (arch == "qwen3")
    assert source.config.head_dim == HEAD_DIMS.get(arch, HEAD_DIM)
    export_pack(source, pack_specs(source.config, 0)[0], "float32", 1, tmp_path / "decoder.onnx")
    for got, past, want, want_past in run_both(tmp_path / "decoder.onnx", source, transformers_model(path)):
        assert np.abs(got - want).max() < 1e-4
        for p, w in zip(past, want_past):
            assert np.abs(p - w).max() < 1e-4


def test_phi3s_fused_projections_are_split_and_their_int4_blocks_too(tmp_path):
    """q/k/v cut from attn_qkv's rows and gate/up from ffn_up's, as floats and as int4 blocks (whose
    scales and corrections are per row too), both equal to transformers' fused tensors' rows."""
    path = write_gguf(tmp_path / "tiny-phi3.gguf", "phi3")
    source = resolve(str(path))
    assert source.config.family == "phi3"
    quantized = gguf_blocks.quantized(source, Quantize(method="rtn"), log=lambda _: None)
    state = transformers_model(path).model.state_dict()
    q, kv = HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM
    rows = {"self_attn.q_proj": ("self_attn.qkv_proj", 0, q), "self_attn.k_proj": ("self_attn.qkv_proj", q, q + kv),
            "self_attn.v_proj": ("self_attn.qkv_proj", q + kv, q + 2 * kv),
            "mlp.gate_proj": ("mlp.gate_up_proj", 0, INTER), "mlp.up_proj": ("mlp.gate_up_proj", INTER, 2 * INTER)}
    for i in range(LAYERS):
        for module, (fused, start, end) in rows.items():
            name = f"layers.{i}.{module}.weight"
            want = state[f"layers.{i}.{fused}.weight"][start:end]
            assert torch.equal(source.read_tensors([name])[name], want), name
            assert torch.equal(quantized.linears[name].dequantized(), want), name


def test_the_lm_tensors_and_the_reference_weights_are_the_files(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf", tied=False)
    source = resolve(str(path))
    model = transformers_model(path)
    lm = source.read_lm()
    torch.testing.assert_close(lm["embed_tokens.weight"], model.model.embed_tokens.weight, rtol=0, atol=0)
    torch.testing.assert_close(lm["lm_head.weight"], model.lm_head.weight, rtol=0, atol=0)
    state = model.model.state_dict()
    for name, t in source.read_reference().items():
        torch.testing.assert_close(t, state[name], rtol=0, atol=0, msg=name)


def test_tied_embeddings_give_the_embedding_as_the_lm_head(tmp_path):
    source = resolve(str(write_gguf(tmp_path / "tiny.gguf", tied=True)))
    lm = source.read_lm()
    assert source.config.tie_word_embeddings and torch.equal(lm["lm_head.weight"], lm["embed_tokens.weight"])


def test_int4_blocks_are_imported_exactly_as_transformers_dequantizes_them(tmp_path):
    """Q4_0 (no correction), Q4_1 and Q4_K (per-32 scale and correction), q and k through llama.cpp's
    permutation: kvplan's int4 values dequantize to transformers' float32 tensors bit for bit."""
    path = write_gguf(tmp_path / "tiny.gguf")
    source = resolve(str(path))
    quantized = gguf_blocks.quantized(source, Quantize(method="awq"), log=lambda _: None)
    state = transformers_model(path).model.state_dict()
    module = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "ffn_gate": "mlp.gate_proj",
              "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}
    assert sorted(quantized.linears) == sorted(f"layers.{i}.{module[m]}.weight" for i in range(LAYERS) for m in INT4)
    for i in range(LAYERS):
        for gguf_name, hf in module.items():
            ql = quantized.linears[f"layers.{i}.{hf}.weight"]
            assert ql.group_size == 32 and int(ql.q.min()) >= -8 and int(ql.q.max()) <= 7
            assert (ql.correction is None) == (LINEAR_TYPES[gguf_name] == Q.Q4_0)
            torch.testing.assert_close(ql.dequantized(), state[f"layers.{i}.{hf}.weight"], rtol=0, atol=0)


def test_a_q4_k_block_unpacks_to_the_documented_values(tmp_path):
    """One row of two super-blocks, against W = d·sc·q − dmin·m computed here from the packed fields,
    and against gguf.quants.dequantize."""
    rng = np.random.default_rng(3)
    blocks = q4_k_bytes(rng, 1, 512)
    q, scale, correction = gguf_blocks.unpack(blocks, Q.Q4_K, 1, 512)
    want = gguf.quants.dequantize(blocks, Q.Q4_K)
    got = (q.float() * scale.repeat_interleave(32, 1) + correction.repeat_interleave(32, 1)).numpy()
    np.testing.assert_array_equal(got, want)
    b = blocks.reshape(2, 144)
    d = b[0, 0:2].view(np.float16).astype(np.float32)[0]
    dmin = b[0, 2:4].view(np.float16).astype(np.float32)[0]
    sc0, m0 = int(b[0, 4] & 63), int(b[0, 8] & 63)           # sub-block 0: the low 6 bits of bytes 0 and 4
    q0 = b[0, 16:48] & 0xF                                    # its values: the low nibbles of chunk 0
    np.testing.assert_array_equal(want[0, :32], np.float32(d * sc0) * q0.astype(np.float32) - np.float32(dmin * m0))
    assert torch.equal(q[0, :32], torch.from_numpy(q0.astype(np.int8) - 8))


def build(tmp_path: Path, model: Path, profile: str, stop_after: str = "quantize") -> Path:
    assert build_main(["--model", str(model), "--profile", profile, "--out", str(tmp_path / "out"),
                       "--stop-after", stop_after]) == 0
    return tmp_path / "out" / model.stem / Path(profile).stem


def test_an_int4_profile_imports_the_blocks_and_says_so(tmp_path, capsys):
    """int4-awq's group size 128 is not applied (and not checked against the model): the file's
    Q4_0/Q4_1/Q4_K linears become int4 block 32, Q8_0 and F16 ones stay float16, each reported;
    the int4 graph in ONNX Runtime computes what transformers computes from the file."""
    path = write_gguf(tmp_path / "tiny.gguf")
    target = build(tmp_path, path, "int4-awq")
    out = capsys.readouterr().out
    assert "quantize.method 'awq' (group_size 128) not applied: tiny.gguf holds its own int4 blocks" in out
    blocks = {m: LAYERS * SHAPES[m][0] * SHAPES[m][1] // 32 for m in SHAPES}
    assert (f"imported 10 linears as int4 block 32: Q4_0 2 linears ({blocks['attn_q']} blocks), Q4_1 4 linears "
            f"({blocks['attn_k'] + blocks['ffn_up']} blocks), Q4_K 4 linears "
            f"({blocks['ffn_gate'] + blocks['ffn_down']} blocks)") in out
    assert "kept in the profile dtype (not int4 blocks): F16 2 linears (layers.0.self_attn.o_proj.weight" in out
    assert "Q8_0 2 linears (layers.0.self_attn.v_proj.weight, layers.1.self_attn.v_proj.weight)" in out
    record = json.loads((target / "manifest.json").read_text())["stages"]["quantize"]
    assert record["method"] == "import-gguf" and record["group_size"] == 32
    assert record["imported"]["Q4_K"] == {"linears": 4, "blocks_of_32": blocks["ffn_gate"] + blocks["ffn_down"]}
    ops = [n.op_type for n in onnx.load(str(target / "decoder.int4.onnx")).graph.node]
    assert ops.count("DequantizeLinear") == 10
    assert ops.count("ReduceSum") == 8                     # Q4_1 and Q4_K: a correction each; Q4_0 none
    source = resolve(str(path))
    for got, _, want, _ in run_both(target / "decoder.int4.onnx", source, transformers_model(path), torch.float16):
        assert np.abs(got - want).max() < 5e-2           # the fp16 graph against transformers in fp32


def test_a_profile_without_quantize_builds_the_dequantized_weights(tmp_path, capsys):
    target = build(tmp_path, write_gguf(tmp_path / "tiny.gguf"), "fp16", stop_after="export")
    assert "decoder tensors F16 x2, F32 x5, Q4_0 x2, Q4_1 x4, Q4_K x4, Q8_0 x2, read dequantized" in \
        capsys.readouterr().out
    ops = [n.op_type for n in onnx.load(str(target / "decoder.onnx")).graph.node]
    assert "DequantizeLinear" not in ops
    assert "quantize" not in json.loads((target / "manifest.json").read_text())["stages"]


def test_a_gguf_without_int4_blocks_is_quantized_by_the_profile(tmp_path):
    """An F16 file is a float source: the profile's method runs (here rtn, group 32) as on any other."""
    path = write_gguf(tmp_path / "f16.gguf", types={k: Q.F16 for k in LINEAR_TYPES})
    profile = tmp_path / "rtn.toml"
    from kvplan import profiles  # the shipped profile, edited
    text = (profiles.PROFILES_DIR / "int4-awq.toml").read_text().replace('method = "awq"', 'method = "rtn"')
    profile.write_text(text.replace("group_size = 128", "group_size = 32"))
    target = build(tmp_path, path, str(profile))
    assert json.loads((target / "manifest.json").read_text())["stages"]["quantize"]["method"] == "rtn"


def cli_error(capsys, model: Path) -> str:
    assert build_main(["--model", str(model), "--profile", "fp16", "--out", str(model.parent / "out"),
                       "--stop-after", "export"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (model.parent / "out").exists() or not any((model.parent / "out").rglob("*.onnx"))
    return err


def test_an_unsupported_architecture_is_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "mamba.gguf"
    w = gguf.GGUFWriter(str(path), "mamba")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    err = cli_error(capsys, path)
    assert f"{path}: general.architecture 'mamba' is not supported (supported: llama, qwen2, qwen3, gemma2, phi3)" in err


@pytest.mark.parametrize("kind, message", [
    (Q.I32, "type I32 is an integer type, not weights"),
    # Q8_K is llama.cpp's intermediate type for dot products: the gguf package has no dequantization.
    (Q.Q8_K, "type Q8_K is not supported (the gguf package has no dequantization for it)")])
def test_an_unsupported_tensor_type_is_one_line_naming_the_tensor(tmp_path, capsys, kind, message):
    path = write_gguf(tmp_path / "good.gguf")
    bad = tmp_path / f"{kind.name}.gguf"
    w = gguf.GGUFWriter(str(bad), "llama")
    reader = gguf.GGUFReader(path)
    for field in reader.fields.values():
        if field.name.startswith("llama."):
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        if t.name == "blk.1.ffn_up.weight" and kind == Q.I32:
            w.add_tensor(t.name, np.zeros((INTER, HIDDEN), np.int32))
        elif t.name == "blk.1.ffn_up.weight":
            raw = np.zeros(gguf.quants.quant_shape_to_byte_shape((INTER, HIDDEN), kind), np.uint8)
            w.add_tensor(t.name, raw, raw_shape=raw.shape, raw_dtype=kind)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    err = cli_error(capsys, bad)
    assert f"{bad}: tensor 'blk.1.ffn_up.weight': {message}" in err


def test_a_truncated_gguf_is_one_line(tmp_path, capsys):
    path = write_gguf(tmp_path / "full.gguf")
    cut = tmp_path / "cut.gguf"
    data = path.read_bytes()
    cut.write_bytes(data[:len(data) - 1000])
    err = cli_error(capsys, cut)
    assert f"{cut}: not a readable GGUF file, truncated or corrupt" in err


def test_rotary_factor_tensors_are_refused_not_dropped(tmp_path):
    path = write_gguf(tmp_path / "llama3.gguf",
                      extra=lambda w: w.add_tensor("rope_freqs.weight", np.ones(HEAD_DIM // 2, np.float32)))
    with pytest.raises(ModelError, match=r"tensor 'rope_freqs.weight' has no counterpart in kvplan's llama decoder "
                                         r"\(rotary frequency factors"):
        resolve(str(path))


def test_a_missing_tensor_is_named(tmp_path):
    path = write_gguf(tmp_path / "tiny.gguf")
    reader = gguf.GGUFReader(path)
    short = tmp_path / "short.gguf"
    w = gguf.GGUFWriter(str(short), "llama")
    for field in reader.fields.values():
        if field.name.startswith("llama."):
            w.add_key_value(field.name, field.contents(), field.types[0])
    for t in reader.tensors:
        if t.name != "blk.1.attn_norm.weight":
            w.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(ModelError, match=r"tensor 'blk.1.attn_norm.weight' \(the checkpoint's "
                                         r"layers.1.input_layernorm.weight\) is missing"):
        resolve(str(short))


# --- the real file: SmolLM2-135M-Instruct, Q4_1 -------------------------------------------------

def test_the_real_gguf_reads_as_transformers_converted_it(smollm2_gguf, smollm2_checkpoint):
    """Config, q/k rows (llama.cpp's permutation undone) and tokenizer equal those of the checkpoint
    transformers' own loader converted from the same file."""
    source = resolve(str(smollm2_gguf))
    assert source.config == resolve(str(smollm2_checkpoint)).config
    from safetensors import safe_open  # the converted checkpoint's tensors, read directly
    names = ["layers.0.self_attn.q_proj.weight", "layers.29.self_attn.k_proj.weight", "layers.3.mlp.down_proj.weight"]
    with safe_open(str(smollm2_checkpoint / "model.safetensors"), framework="pt") as f:
        for name, t in source.read_tensors(names).items():
            assert torch.equal(t.half(), f.get_tensor(f"model.{name}")), name
    tok = source.tokenizer()
    assert tok.encode("Paris is the capital of") == [38634, 314, 260, 3575, 282]
    assert tok.eos_ids == (2,)


def test_the_real_gguf_int4_import_is_exact(smollm2_gguf):
    """All 210 Q4_1 linears: kvplan's int4 values (q − 8, scale d, correction 8d + m) dequantize to
    gguf.quants.dequantize of the file's own blocks bit for bit (float32; the rows of q and k are put
    in the checkpoint's order on both sides, which the test above checks against transformers)."""
    source = resolve(str(smollm2_gguf))
    quantized = gguf_blocks.quantized(source, Quantize(method="awq", group_size=128), log=lambda _: None)
    assert len(quantized.linears) == 210
    assert quantized.record["imported"] == {"Q4_1": {"linears": 210, "blocks_of_32": 3317760}}
    file = source.gguf
    for name, ql in quantized.linears.items():
        t = file.tensor(name)
        want = file.rows(name, torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)))
        assert torch.equal(ql.dequantized(), want), name


@pytest.mark.slow
def test_the_real_gguf_int4_values_equal_transformers_reading(smollm2_gguf):
    source = resolve(str(smollm2_gguf))
    quantized = gguf_blocks.quantized(source, Quantize(method="awq"), log=lambda _: None)
    for name, t in source.read_reference(norm=False).items():            # transformers' own conversion
        if name in quantized.linears:
            assert torch.equal(quantized.linears[name].dequantized(), t), name


@pytest.mark.slow
def test_the_real_gguf_builds_fp16_and_int4_engines_and_int4_is_under_half(smollm2_gguf, backend, tmp_path):
    """Both plans hold the weights once (measured: 245.0 and 103.3 MB; the linears at 4 bits plus a
    scale per block of 32, the norms in fp16, and the plan's own code)."""
    out = tmp_path / "engines"
    sizes = {}
    for profile in ("fp16", "int4-awq"):
        assert build_main(["--model", str(smollm2_gguf), "--profile", profile, "--out", str(out)]) == 0
        sizes[profile] = (out / smollm2_gguf.stem / profile / "decoder.plan").stat().st_size
    assert sizes["int4-awq"] <= 0.45 * sizes["fp16"], sizes


def test_a_gguf_targets_dependency_is_the_file_itself(tmp_path):
    from kvplan import profiles  # the build-system view of a target
    from kvplan.target import dependencies
    path = write_gguf(tmp_path / "tiny.gguf")
    deps = dependencies(resolve(str(path)), profiles.load("fp16"), tmp_path / "out")["depends"]
    assert str(path.absolute()) in deps and not any(d.endswith("config.json") for d in deps)
