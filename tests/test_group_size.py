"""The int4 group size is fitted to the model as the optimization profiles' shapes are."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
from test_int4_every_layer import hf_checkpoint
from test_quantize import write_profile

from kvplan import profiles
from kvplan.cli import build_main
from kvplan.errors import ProfileError
from kvplan.models.presets import PRESETS

# SmolLM2-135M's sizes: hidden 576 = 9 x 64, intermediate 1536.
SMOL = replace(PRESETS["tiny-llama"], hidden_size=576, intermediate_size=1536, num_heads=9, num_kv_heads=3,
               head_dim=64)


def test_the_shipped_int4_profile_takes_the_largest_group_size_that_divides_every_linear():
    fitted = profiles.fit_group_size(profiles.load("int4-awq"), SMOL)
    assert fitted.quantize.group_size == 64
    assert fitted.adjusted == ("quantize.group_size 128 -> 64 (the largest of 128, 64, 32 that divides every "
                               "quantized linear's input size: 576, 1536)",)


def test_only_the_linears_quantized_count():
    shipped = profiles.load("int4-awq")
    only_mlp_up = replace(shipped, quantize=replace(shipped.quantize, linears=("gate_proj", "up_proj")))
    assert profiles.fit_group_size(only_mlp_up, replace(SMOL, hidden_size=640)).quantize.group_size == 128


def test_a_shipped_profile_whose_group_size_divides_is_unchanged():
    shipped = profiles.load("int4-awq")
    assert profiles.fit_group_size(shipped, PRESETS["minicpmo26-tts"]) is shipped


def test_a_model_no_group_size_divides_is_refused_naming_the_field_and_sizes():
    with pytest.raises(ProfileError, match=r"int4-awq.toml: quantize.group_size: none of 32, 64, 128 divides the "
                                           r"model's linear input sizes 576, 1000"):
        profiles.fit_group_size(profiles.load("int4-awq"), replace(SMOL, intermediate_size=1000))


def test_a_profile_of_your_own_keeps_its_group_size(tmp_path):
    mine = profiles.load(write_profile(tmp_path, group_size=128))
    assert profiles.fit_group_size(mine, SMOL) is mine


def test_a_build_with_the_shipped_profile_prints_and_records_the_fitted_group_size(tmp_path, capsys):
    ckpt = hf_checkpoint(tmp_path / "narrow")        # hidden 64, intermediate 128: group 64
    assert build_main(["--model", str(ckpt), "--profile", "int4-awq", "--out", str(tmp_path / "out"),
                       "--stop-after", "quantize"]) == 0
    assert "kvplan: profile int4-awq: quantize.group_size 128 -> 64" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "out" / "narrow" / "int4-awq" / "manifest.json").read_text())
    assert manifest["profile"]["quantize"]["group_size"] == 64
    assert manifest["stages"]["quantize"]["group_size"] == 64


def test_an_explicit_group_size_that_does_not_divide_is_refused(tmp_path, capsys):
    ckpt = hf_checkpoint(tmp_path / "narrow")
    assert build_main(["--model", str(ckpt), "--profile", write_profile(tmp_path, group_size=128),
                       "--out", str(tmp_path / "out"), "--stop-after", "quantize"]) == 2
    assert "quantize.group_size 128 does not divide the input size 64" in capsys.readouterr().err
