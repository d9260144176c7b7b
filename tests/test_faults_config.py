"""Bad values in a model's config or a profile: one line naming the file and the field (or the
tensor), exit 2, within a second, before anything of the size a config promises is built.

Each checkpoint is tiny-llama's weights written in Hugging Face's layout (or an AutoAWQ/GPTQ
checkpoint, or a GGUF file, as the format's own tests write them), with config.json edited.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_gguf import write_gguf
from test_models import write_hf_dir
from test_quantize_checkpoint import write_checkpoint

from kvplan import profiles
from kvplan.cli import build_main
from kvplan.errors import KvplanError, ProfileError
from kvplan.models import resolve  # any source, an AWQ/GPTQ import included
from kvplan.models.families import hf_config_dict
from kvplan.models.presets import PRESETS

ROOT = Path(__file__).resolve().parent.parent
CONFIG = hf_config_dict(PRESETS["tiny-llama"])      # 4 layers, hidden 64, 4 heads of 16, 2 KV heads


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """tiny-llama's tensors in one model.safetensors, which each test pairs with its own config.json."""
    directory = tmp_path_factory.mktemp("weights")
    write_hf_dir(directory, "tiny-llama", shards=1)
    return directory / "model.safetensors"


def checkpoint(tmp_path: Path, weights: Path, config) -> Path:
    """A checkpoint directory: ``weights`` and ``config`` (a dict, or config.json's text as written)."""
    directory = tmp_path / "ckpt"
    directory.mkdir()
    (directory / "model.safetensors").symlink_to(weights)
    (directory / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    return directory


def build(model: Path | str, capsys, *extra: str, profile: str = "fp32") -> tuple[int, str, float]:
    """build_main's exit code, its stderr, and the seconds it took (the imports already paid)."""
    t0 = time.perf_counter()
    code = build_main(["--model", str(model), "--profile", profile, "--out", str(Path(str(model)).parent / "out"),
                       "--stop-after", "export", *extra])
    return code, capsys.readouterr().err, time.perf_counter() - t0


def refused(code: int, err: str, seconds: float, *words: str) -> bool:
    """Exit 2, one error line holding every one of ``words``, no traceback, within a second."""
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    missing = [w for w in words if w not in lines[0]]
    assert not missing, f"{lines[0]!r} does not say {missing[0]!r}"
    assert seconds < 1.0, f"refused after {seconds:.1f} s"
    return True


# --------------------------------------------------------------------------- config.json values

def test_a_config_json_that_is_a_list_is_refused_naming_the_file(tmp_path, weights, capsys):
    model = checkpoint(tmp_path, weights, "[1, 2, 3]")
    assert refused(*build(model, capsys), f"{model / 'config.json'}: not a JSON object")


def test_a_rope_theta_of_zero_is_refused_naming_the_field(tmp_path, weights, capsys):
    model = checkpoint(tmp_path, weights, {**CONFIG, "rope_theta": 0})
    assert refused(*build(model, capsys), "config.json: rope_theta must be a positive number, got 0")


def test_a_max_position_embeddings_of_nan_is_refused_naming_the_field(tmp_path, weights, capsys):
    model = checkpoint(tmp_path, weights, json.dumps({**CONFIG, "max_position_embeddings": math.nan}))
    assert refused(*build(model, capsys), "config.json: max_position_embeddings must be an integer, got nan")


def test_a_negative_rms_norm_eps_is_refused_naming_the_field(tmp_path, weights, capsys):
    model = checkpoint(tmp_path, weights, {**CONFIG, "rms_norm_eps": -1})
    assert refused(*build(model, capsys), "config.json: rms_norm_eps must be a positive number, got -1")


def test_a_switch_written_as_a_string_is_refused_not_read_as_true(tmp_path, weights, capsys):
    """bool("false") is True: the string would have asked for biases the checkpoint has not got."""
    model = checkpoint(tmp_path, weights, {**CONFIG, "attention_bias": "false"})
    assert refused(*build(model, capsys), "config.json: attention_bias must be true or false, got 'false'")


def test_a_hidden_size_the_heads_do_not_divide_is_refused_without_a_head_dim(tmp_path, weights, capsys):
    config = {k: v for k, v in CONFIG.items() if k != "head_dim"} | {"hidden_size": 66}
    model = checkpoint(tmp_path, weights, config)
    assert refused(*build(model, capsys), "hidden_size 66 is not a multiple of num_attention_heads 4")


# --------------------------------------------------------------------------- sizes against the tensors

def test_a_hidden_size_the_tensors_do_not_hold_is_refused_from_the_headers_when_the_model_opens(
        tmp_path, weights, capsys):
    """Refused by resolve(), which reads the headers only: the export, which allocates activations of
    the hidden size before it binds a weight, never starts."""
    model = checkpoint(tmp_path, weights, {**CONFIG, "hidden_size": 1e9})
    with pytest.raises(KvplanError) as e:
        resolve(str(model))
    assert str(e.value) == (f"{model / 'model.safetensors'}: tensor 'model.layers.0.self_attn.q_proj.weight' has "
                            f"shape [64, 64], but {model / 'config.json'}'s hidden_size = 1000000000 needs "
                            f"[64, 1000000000]")
    assert refused(*build(model, capsys), "hidden_size = 1000000000")


def test_an_intermediate_size_the_tensors_do_not_hold_names_the_tensor_and_the_field(tmp_path, weights, capsys):
    model = checkpoint(tmp_path, weights, {**CONFIG, "intermediate_size": 96})
    assert refused(*build(model, capsys), "tensor 'model.layers.0.mlp.gate_proj.weight' has shape [128, 64], but ",
                   "config.json's intermediate_size = 96 needs [96, 64]")


def test_more_layers_than_the_checkpoint_holds_names_the_first_missing_layer_at_once(tmp_path, weights):
    """A million layers over a checkpoint of four: refused in a second, without building a module for
    any of them (a fresh process, so its peak memory is this build's)."""
    model = checkpoint(tmp_path, weights, {**CONFIG, "num_hidden_layers": 1_000_000})
    script = ("import resource, sys, time\n"
              "from kvplan.cli import build_main\n"
              "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
              "t0 = time.perf_counter()\n"
              f"code = build_main(['--model', {str(model)!r}, '--profile', 'fp32', '--out', {str(tmp_path / 'out')!r}, "
              "'--stop-after', 'export'])\n"
              "grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before\n"
              "print(code, time.perf_counter() - t0, grown // 1024)\n")
    r = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    code, seconds, grown_mib = r.stdout.split()
    assert refused(int(code), r.stderr, float(seconds),
                   f"{model}: tensor 'model.layers.4.self_attn.q_proj.weight' is missing: "
                   f"{model / 'config.json'}'s num_hidden_layers = 1000000, but the checkpoint holds 4 layers")
    assert int(grown_mib) < 100, f"peak RSS grew by {grown_mib} MiB"


def test_a_minicpmo_config_names_its_tts_config_fields(tmp_path):
    """MiniCPM-o's TTS decoder has as many key/value heads as attention heads: tiny-llama-outliers' shape."""
    directory = tmp_path / "minicpmo"
    write_hf_dir(tmp_path / "w", "tiny-llama-outliers", shards=1)
    config = hf_config_dict(PRESETS["tiny-llama-outliers"])
    tts = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                  "max_position_embeddings")} | {"num_hidden_layers": 9}
    tensors = {k.replace("model.", "tts.model.", 1): v for k, v in load_file(tmp_path / "w" / "model.safetensors").items()}
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"model_type": "minicpmo", "tts_config": tts}))
    with pytest.raises(KvplanError, match=r"tensor 'tts.model.layers.2.self_attn.q_proj.weight' is missing: .*"
                                          r"config.json's tts_config.num_hidden_layers = 9, but the checkpoint "
                                          r"holds 2 layers"):
        resolve(str(directory))


def test_a_tts_config_field_the_tts_does_not_read_is_ignored_and_said(tmp_path):
    directory = tmp_path / "minicpmo"
    write_hf_dir(tmp_path / "w", "tiny-llama-outliers", shards=1)
    config = hf_config_dict(PRESETS["tiny-llama-outliers"])
    tts = {k: config[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
                                  "max_position_embeddings")} | {"num_key_value_heads": 1, "rope_theta": 5.0}
    tensors = {k.replace("model.", "tts.model.", 1): v for k, v in load_file(tmp_path / "w" / "model.safetensors").items()}
    directory.mkdir()
    save_file(tensors, directory / "model.safetensors")
    (directory / "config.json").write_text(json.dumps({"model_type": "minicpmo", "tts_config": tts}))
    source = resolve(str(directory))
    assert source.config.num_kv_heads == 4 and source.config.rope_theta == 10000.0
    assert any("tts_config's num_key_value_heads, rope_theta not read" in note for note in source.notes)


def test_an_awq_checkpoint_whose_config_outgrows_its_qweights_names_the_packed_tensor(tmp_path):
    write_checkpoint(tmp_path / "awq", "awq", symmetric=True)
    config = json.loads((tmp_path / "awq" / "config.json").read_text())
    (tmp_path / "awq" / "config.json").write_text(json.dumps({**config, "intermediate_size": 256}))
    with pytest.raises(KvplanError, match=r"tensor 'model.layers.0.mlp.gate_proj.qweight' packs a \[128, 64\] "
                                          r"linear, but .*config.json's intermediate_size = 256 needs \[256, 64\]"):
        resolve(str(tmp_path / "awq"))


def _gguf_with(src: Path, dst: Path, key: str, value: int) -> Path:
    """``src`` rewritten with metadata ``key`` set to ``value`` (the tensors as they are)."""
    reader = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), "llama")
    for field in reader.fields.values():
        if field.name.startswith("llama.") and field.name != key:
            w.add_key_value(field.name, field.contents(), field.types[0])
    w.add_uint32(key, value)
    for t in reader.tensors:
        w.add_tensor(t.name, np.array(t.data), raw_shape=t.data.shape, raw_dtype=t.tensor_type)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    return dst


@pytest.mark.parametrize("key, value, message", [
    # (Fewer than the Hugging Face case's million: before the check, opening this file built modules for
    # every block and needed 22 GB for a million.)
    ("llama.block_count", 50_000, r"tensor 'blk.2.attn_q.weight' \(the checkpoint's "
                                  r"layers.2.self_attn.q_proj.weight\) is missing: .*'s llama.block_count = "
                                  r"50000, but the checkpoint holds 2 layers"),
    ("llama.feed_forward_length", 768, r"tensor 'blk.0.ffn_gate.weight' \(the checkpoint's "
                                       r"layers.0.mlp.gate_proj.weight\) has shape \[512, 256\], but .*'s "
                                       r"llama.feed_forward_length = 768 needs \[768, 256\]"),
])
def test_a_gguf_whose_metadata_outgrows_its_tensors_is_refused_naming_the_key(tmp_path, key, value, message):
    path = _gguf_with(write_gguf(tmp_path / "tiny.gguf"), tmp_path / "edited.gguf", key, value)
    t0 = time.perf_counter()
    with pytest.raises(KvplanError, match=message):
        resolve(str(path))
    assert time.perf_counter() - t0 < 1.0


# --------------------------------------------------------------------------- AWQ / GPTQ tensor dtypes

@pytest.mark.parametrize("method, part, dtype, says", [
    ("awq", "scales", torch.int32, "AWQ scales must be a float dtype"),
    ("gptq", "g_idx", torch.float32, "GPTQ g_idx must be an integer dtype"),
    ("gptq", "qzeros", torch.int64, "GPTQ qzeros must be int32"),
])
def test_a_packed_linear_part_in_the_wrong_dtype_is_refused_naming_the_tensor_and_file(
        tmp_path, method, part, dtype, says):
    """Cast silently, int32 scales and float group numbers read as plausible, wrong weights."""
    directory = tmp_path / method
    write_checkpoint(directory, method, symmetric=True)
    tensors = load_file(directory / "model.safetensors")
    name = f"model.layers.1.self_attn.v_proj.{part}"
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, directory / "model.safetensors")
    with pytest.raises(KvplanError) as e:
        resolve(str(directory))
    assert str(e.value).startswith(f"{directory / 'model.safetensors'}: tensor {name!r}: dtype ") and says in str(e.value)


# --------------------------------------------------------------------------- profile fields

def profile_error(tmp_path: Path, old: str, new: str) -> str:
    """The error loading the shipped fp32 profile with its line ``old`` replaced by ``new``."""
    text = (profiles.PROFILES_DIR / "fp32.toml").read_text()
    assert old in text
    path = tmp_path / "p.toml"
    path.write_text(text.replace(old, new))
    with pytest.raises(ProfileError) as e:
        profiles.load(str(path))
    return str(e.value)


@pytest.mark.parametrize("old, new, field", [("atol = 3e-4", "atol = nan", "atol"), ("rtol = 1e-4", "rtol = inf", "rtol")])
def test_a_tolerance_that_is_not_a_finite_number_is_refused_naming_the_field(tmp_path, old, new, field):
    """NaN compares false with everything and inf true: either makes every validation point's verdict
    a foregone one."""
    error = profile_error(tmp_path, old, new)
    assert error.startswith(f"{tmp_path / 'p.toml'}: validate.{field}: must be a finite number >= 0, got")


def test_a_surgery_pass_listed_twice_is_refused_naming_the_field(tmp_path):
    error = profile_error(tmp_path, 'passes = ["rmsnorm", "rope", "attention", "gqa", "residual2d"]',
                          'passes = ["rmsnorm", "rope", "rmsnorm"]')
    assert error == f"{tmp_path / 'p.toml'}: surgery.passes: pass 'rmsnorm' is listed more than once"


# --------------------------------------------------------------------------- what caused a shape error

def test_shapes_beyond_the_models_positions_name_the_shapes_option_not_the_profile(tmp_path, capsys):
    option = "decode:N=1,1,1:lastSum=0,100,5000"
    code = build_main(["--model", "tiny-llama", "--profile", "fp16", "--out", str(tmp_path / "out"),
                       "--stop-after", "export", "--shapes", option])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == (f"error: --shapes {option}: optimization profile 'decode': N max + lastSum "
                                         f"max = 5001 exceeds preset tiny-llama's max_position_embeddings = 4096")
    assert "fp16.toml" not in err


def test_a_model_too_short_for_a_shipped_profile_names_its_config_field(tmp_path, weights, capsys):
    model = checkpoint(tmp_path, weights, {**CONFIG, "max_position_embeddings": 1})
    code, err, _ = build(model, capsys, profile="fp16")
    assert code == 2 and err.startswith(f"error: {model / 'config.json'}'s max_position_embeddings = 1: too few "
                                        f"positions for ")
