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
    assert profile.shapes and profile.validate.atol > 0


def test_shipped_profiles_cover_fp16_bf16_fp32():
    assert {"fp16", "bf16", "fp32"} <= set(SHIPPED)
    assert {load(n).dtype for n in ("fp16", "bf16", "fp32")} == {"float16", "bfloat16", "float32"}


def test_default_profile_covers_the_tts_prefix_and_decode():
    shapes = {s.name: s for s in load("fp16").shapes}
    assert shapes["prefill"].N == Range(1, 303, 512) and shapes["prefill"].lastSum.min == 0
    assert shapes["decode"].N == Range(1, 1, 2) and shapes["decode"].lastSum == Range(1, 302, 4094)
    assert shapes["decode"].sumN == Range(2, 303, 4096)


def test_min_above_opt():
    data = base()
    data["engine"]["shapes"][0]["N"] = [4, 2, 8]
    assert error_of(data) == "p.toml: engine.shapes[0].N: must satisfy min <= opt <= max, got [4, 2, 8]"


def test_n_range_the_mask_cannot_express():
    data = base()
    data["engine"]["shapes"][1]["N"] = [0, 1, 1]
    assert error_of(data) == ("p.toml: engine.shapes[1].N: min 0 must be >= 1 (a step needs at least one new "
                              "token: the attention mask has N query rows)")


def test_sum_beyond_max_positions():
    profile = load("fp16")
    with pytest.raises(ProfileError, match=r"fp16.toml: engine.shapes 'prefill': N max \+ lastSum max = 4096 "
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
    assert error_of(data) == "p.toml: export.batch: must be an integer or [min, opt, max], got '1'"


def test_duplicate_profile_names():
    data = base()
    data["engine"]["shapes"][1]["name"] = "prefill"
    assert error_of(data) == "p.toml: engine.shapes[1].name: duplicate profile name 'prefill'"


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
    assert parse(data, "p.toml", "p").export.cache_len == 4096
    data["export"]["cache_len"] = 4100
    assert parse(data, "p.toml", "p").export.cache_len == 4100


def test_inplace_buffer_too_small_for_a_profile():
    data = base()
    data["export"].update(kv_io="inplace", cache_len=1024)
    assert error_of(data) == ("p.toml: export.cache_len: 1024 rows cannot hold engine.shapes 'prefill''s "
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


# --------------------------------------------------------------------------- fitting to the model

def test_a_shipped_profile_is_fitted_to_a_model_with_fewer_positions():
    fitted = profiles.fit_to_model(profiles.load("fp16"), 2048)
    shapes = {s.name: s for s in fitted.shapes}
    assert shapes["prefill"].N == Range(1, 303, 512) and shapes["prefill"].lastSum == Range(0, 0, 1536)
    assert shapes["decode"].N == Range(1, 1, 2) and shapes["decode"].lastSum == Range(1, 302, 2046)
    assert all(s.sumN.max <= 2048 for s in fitted.shapes)
    assert len(fitted.adjusted) == 2 and "prefill: N [1, 303, 512] -> [1, 303, 512], lastSum [0, 0, 3584] -> " \
                                           "[0, 0, 1536]" in fitted.adjusted[0]


def test_fitting_keeps_opt_points_inside_the_clamped_ranges():
    fitted = profiles.fit_to_model(profiles.load("fp16"), 256)
    prefill = {s.name: s for s in fitted.shapes}["prefill"]
    assert prefill.N == Range(1, 256, 256) and prefill.lastSum == Range(0, 0, 0)


def test_a_shipped_profile_that_fits_is_unchanged():
    profile = profiles.load("fp16")
    assert profiles.fit_to_model(profile, 4096) is profile


def test_a_user_written_profile_that_does_not_fit_is_still_refused(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text((profiles.PROFILES_DIR / "fp16.toml").read_text())
    with pytest.raises(ProfileError, match=r"mine.toml: engine.shapes 'prefill': N max \+ lastSum max = 4096 "
                                           r"exceeds the model's max_position_embeddings \(2048\)"):
        profiles.fit_to_model(profiles.load(str(path)), 2048)


def test_a_model_too_short_for_even_the_minimum_is_refused():
    with pytest.raises(ProfileError, match="even N min \\+ lastSum min = 2 exceeds the model's 1 positions"):
        profiles.fit_to_model(profiles.load("fp16"), 1)


# --------------------------------------------------------------------------- --shapes

def test_shapes_override_sizes_a_named_optimization_profile():
    profile = profiles.with_shapes(profiles.load("fp16"), ["prefill:N=1,128,512:lastSum=0,0,1536"])
    prefill = {s.name: s for s in profile.shapes}["prefill"]
    assert prefill.N == Range(1, 128, 512) and prefill.lastSum == Range(0, 0, 1536)
    assert profile.adjusted == ("prefill: N [1, 128, 512], lastSum [0, 0, 1536] (--shapes)",)


def test_shapes_override_of_one_axis_keeps_the_other():
    profile = profiles.with_shapes(profiles.load("fp16"), ["decode:lastSum=1,100,1000"])
    decode = {s.name: s for s in profile.shapes}["decode"]
    assert decode.N == Range(1, 1, 2) and decode.lastSum == Range(1, 100, 1000)


def test_shapes_override_can_add_an_optimization_profile():
    profile = profiles.with_shapes(profiles.load("fp16"), ["chunk:N=16,32,64:lastSum=0,512,1024"])
    assert [s.name for s in profile.shapes] == ["prefill", "decode", "chunk"]


@pytest.mark.parametrize("text, message", [
    ("prefill", "expected NAME:N=min,opt,max"),
    ("prefill:N=1,2", r"--shapes: prefill.N: must be \[min, opt, max\] integers"),
    ("prefill:N=0,1,2", r"--shapes: prefill.N: min 0 must be >= 1"),
    ("prefill:N=1,5,2", "min <= opt <= max"),
    ("prefill:M=1,2,3", "axes are N and lastSum"),
    ("prefill:N=a,b,c", "must be min,opt,max integers"),
    ("other:N=1,2,3", "no such optimization profile"),
])
def test_bad_shapes_overrides_are_refused_like_the_toml(text, message):
    with pytest.raises(ProfileError, match=message):
        profiles.with_shapes(profiles.load("fp16"), [text])


def test_overridden_shapes_are_not_fitted_but_checked():
    profile = profiles.with_shapes(profiles.load("fp16"), ["prefill:N=1,128,512:lastSum=0,0,3000"])
    with pytest.raises(ProfileError, match="'prefill': N max \\+ lastSum max = 3512 exceeds"):
        profiles.fit_to_model(profile, 2048, keep=("prefill",))
