"""The [engine] section is one dataclass: each builder option is read from the TOML as its field says,
and a changed value of any of them rebuilds the engine (the tests are generated from the fields)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from kvplan import profiles
from kvplan.errors import ProfileError
from kvplan.manifest import digest
from kvplan.profiles import Engine
from kvplan.trt.stage import EngineStage

OPTIONS = Engine.options()
BACKEND = SimpleNamespace(name="tensorrt-rtx", version="1.7")
DONE = {"surgery": {"artifacts": [{"path": "decoder.fused.onnx", "pack": 0, "sha256": "0" * 64}]}}


def _engine_digest(profile) -> str:
    stage = EngineStage(source=None, profile=profile, target=Path("."), backend=BACKEND, upstream="surgery")
    return digest(stage.inputs(DONE))


def _with_engine_line(tmp_path: Path, key: str, value: str) -> str:
    """The shipped fp16 profile with ``key = value`` in its [engine] table (in place of its own)."""
    text = re.sub(rf"^{key} = .*\n", "", (profiles.PROFILES_DIR / "fp16.toml").read_text(), flags=re.M)
    text, n = re.subn(r"^\[engine\]$", f"[engine]\n{key} = {value}", text, flags=re.M)
    assert n == 1
    path = tmp_path / "p.toml"
    path.write_text(text)
    return str(path)


def _toml(value) -> str:
    return json.dumps(list(value) if isinstance(value, tuple) else value)    # JSON scalars and lists are TOML


@pytest.mark.parametrize("option", OPTIONS, ids=lambda f: f.name)
def test_a_changed_builder_option_rebuilds_the_engine(option):
    profile = profiles.load("fp16")
    changed = profile.with_engine(**{option.name: option.metadata["other"]})
    assert getattr(changed.engine, option.name) != getattr(profile.engine, option.name)
    assert _engine_digest(changed) != _engine_digest(profile)


def test_changed_optimization_profile_shapes_rebuild_the_engine():
    profile = profiles.load("fp16")
    assert _engine_digest(profile.with_engine(shapes=profile.shapes[1:])) != _engine_digest(profile)


@pytest.mark.parametrize("option", OPTIONS, ids=lambda f: f.name)
def test_each_builder_option_is_read_from_the_profile(option, tmp_path):
    other = option.metadata["other"]
    loaded = profiles.load(_with_engine_line(tmp_path, option.name, _toml(other)))
    assert getattr(loaded.engine, option.name) == other


@pytest.mark.parametrize("option", OPTIONS, ids=lambda f: f.name)
def test_a_builder_option_of_the_wrong_type_is_refused_naming_it(option, tmp_path):
    wrong = "[1]" if option.metadata["kind"] is not list else '"8.6"'
    path = _with_engine_line(tmp_path, option.name, wrong)
    with pytest.raises(ProfileError, match=rf"{re.escape(path)}: engine\.{option.name}: must be "):
        profiles.load(path)


def test_the_engine_table_allows_exactly_the_sections_fields(tmp_path):
    path = _with_engine_line(tmp_path, "optimisation_level", "2")
    with pytest.raises(ProfileError, match=r"engine\.optimisation_level: unknown field \(allowed: "
                                           r"compute_capabilities, hardware_compatibility, optimization_level, "
                                           r"shapes, timing_cache, version_compatible, workspace_mib\)"):
        profiles.load(path)


def test_the_old_name_of_the_shapes_tables_is_refused_saying_the_new_one(tmp_path):
    path = tmp_path / "old.toml"
    path.write_text((profiles.PROFILES_DIR / "fp16.toml").read_text().replace("[[engine.shapes]]",
                                                                               "[[engine.profiles]]"))
    with pytest.raises(ProfileError, match=r"old.toml: engine.profiles: is now \[\[engine.shapes\]\]"):
        profiles.load(str(path))
