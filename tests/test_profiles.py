"""Profiles are data: every shipped one loads, and every mistake is named with file and field."""
from __future__ import annotations

import tomllib

import pytest

from kvplan import profiles
from kvplan.profiles import ProfileError, Range, check_against_model, load, parse

SHIPPED = sorted(p.stem for p in profiles.PROFILES_DIR.glob("*.toml"))


def base() -> dict:
    return tomllib.loads((profiles.PROFILES_DIR / "fp16.toml").read_text())


def error_of(data: dict) -> str:
    with pytest.raises(ProfileError) as e:
        parse(data, "p.toml", "p")
    return str(e.value)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_profiles_load(name):
    profile = load(name)
    assert profile.shapes and profile.tolerance.atol > 0


def test_shipped_profiles_cover_fp16_bf16_fp32():
    assert {"fp16", "bf16", "fp32"} <= set(SHIPPED)
    assert {load(n).dtype for n in ("fp16", "bf16", "fp32")} == {"float16", "bfloat16", "float32"}


def test_default_profile_covers_the_tts_prefix_and_decode():
    shapes = {s.name: s for s in load("fp16").shapes}
    assert shapes["prefill"].N == Range(1, 303, 512) and shapes["prefill"].lastSum.min == 0
    assert shapes["decode"].N == Range(1, 1, 1) and shapes["decode"].lastSum == Range(1, 302, 4095)
    assert shapes["decode"].sumN == Range(2, 303, 4096)


def test_min_above_opt():
    data = base()
    data["engine"]["profiles"][0]["N"] = [4, 2, 8]
    assert error_of(data) == "p.toml: engine.profiles[0].N: must satisfy min <= opt <= max, got [4, 2, 8]"


def test_n_range_the_mask_cannot_express():
    data = base()
    data["engine"]["profiles"][1]["N"] = [0, 1, 1]
    assert error_of(data) == ("p.toml: engine.profiles[1].N: min 0 must be >= 1 (a step needs at least one new "
                              "token: the attention mask has N query rows)")


def test_sum_beyond_max_positions():
    profile = load("fp16")
    with pytest.raises(ProfileError, match=r"fp16.toml: engine.profiles 'prefill': N max \+ lastSum max = 4096 "
                                           r"exceeds the model's max_position_embeddings \(2048\)"):
        check_against_model(profile, 2048)


def test_unknown_dtype():
    data = base()
    data["export"]["dtype"] = "float8"
    assert error_of(data) == "p.toml: export.dtype: unknown dtype 'float8' (one of float32, float16, bfloat16)"


def test_missing_field():
    data = base()
    del data["export"]["dtype"]
    assert error_of(data) == "p.toml: export.dtype: missing field"


def test_missing_table():
    data = base()
    del data["engine"]
    assert error_of(data) == "p.toml: engine: missing table"


def test_unknown_field_is_a_typo_not_ignored():
    data = base()
    data["engine"]["optimisation_level"] = 5
    assert error_of(data).startswith("p.toml: engine.optimisation_level: unknown field")


def test_wrong_type():
    data = base()
    data["export"]["batch"] = "1"
    assert error_of(data) == "p.toml: export.batch: must be an integer, got '1'"


def test_duplicate_profile_names():
    data = base()
    data["engine"]["profiles"][1]["name"] = "prefill"
    assert error_of(data) == "p.toml: engine.profiles[1].name: duplicate profile name 'prefill'"


def test_invalid_toml_names_the_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[export\n")
    with pytest.raises(ProfileError, match=r"bad.toml: invalid TOML"):
        load(str(bad))


def test_unknown_profile_lists_shipped():
    with pytest.raises(ProfileError, match=r"nope.toml: no such profile \(shipped: .*fp16"):
        load("nope")


def test_inplace_buffer_defaults_to_the_largest_step_of_the_profiles():
    data = base()
    data["export"]["kv_io"] = "inplace"
    assert parse(data, "p.toml", "p").cache_len == 4096
    data["export"]["cache_len"] = 4100
    assert parse(data, "p.toml", "p").cache_len == 4100


def test_inplace_buffer_too_small_for_a_profile():
    data = base()
    data["export"].update(kv_io="inplace", cache_len=1024)
    assert error_of(data) == ("p.toml: export.cache_len: 1024 rows cannot hold engine.profiles 'prefill''s "
                              "N max + lastSum max = 4096")


def test_inplace_needs_kv_format_0():
    data = base()
    data["export"].update(kv_io="inplace", kv_format=1)
    assert error_of(data) == ("p.toml: export.kv_io: inplace needs kv_format = 0: TensorRT's KV-cache update "
                              "layer takes the cache as [B, kv_heads, S, head_dim]")


def test_cache_len_without_inplace_is_refused_not_ignored():
    data = base()
    data["export"]["cache_len"] = 4096
    assert error_of(data) == "p.toml: export.cache_len: only means something with kv_io = \"inplace\" (this profile has 'concat')"


def test_inplace_buffer_beyond_max_positions():
    data = base()
    data["export"].update(kv_io="inplace", cache_len=8192)
    with pytest.raises(ProfileError, match=r"p.toml: export.cache_len 8192 exceeds the model's "
                                           r"max_position_embeddings \(4096\)"):
        check_against_model(parse(data, "p.toml", "p"), 4096)
