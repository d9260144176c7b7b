"""CMakeLists.txt: engines as targets; a second build with nothing changed runs nothing."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed"),
    pytest.mark.skipif(__import__("importlib").util.find_spec("tensorrt_rtx") is None,
                       reason="the engine targets need TensorRT-RTX (pip install 'kvplan[tensorrt-rtx]')"),
]


def cmake(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(["cmake", *args], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def configured(tmp_path_factory):
    build_dir = tmp_path_factory.mktemp("cmake-build")
    out = tmp_path_factory.mktemp("engines")
    text = cmake("-S", str(ROOT), "-B", str(build_dir), f"-DPython3_EXECUTABLE={sys.executable}",
                 "-DKVPLAN_MODEL=tiny-llama", "-DKVPLAN_PROFILES=fp32", f"-DKVPLAN_OUT={out}", cwd=ROOT)
    assert "kvplan: target engine_tiny_llama_fp32" in text
    return build_dir, out


@pytest.mark.slow  # configures and builds with CMake: about 40 s together
def test_build_makes_the_engine_and_a_second_build_does_nothing(configured):
    build_dir, out = configured
    first = cmake("--build", str(build_dir), cwd=ROOT)
    assert "kvplan: building tiny-llama/fp32" in first
    plan = out / "tiny-llama" / "fp32" / "decoder.plan"
    assert plan.is_file() and (out / "tiny-llama" / "fp32" / "manifest.json").is_file()
    mtime = plan.stat().st_mtime_ns
    second = cmake("--build", str(build_dir), cwd=ROOT)
    assert "kvplan: building" not in second
    assert plan.stat().st_mtime_ns == mtime


@pytest.mark.slow  # configures and builds with CMake: about 40 s together
def test_changed_profile_reruns_only_that_target(configured, tmp_path):
    build_dir, out = configured
    profile = ROOT / "profiles" / "fp32.toml"
    os.utime(profile)          # touched: CMake reruns the pipeline, which finds nothing changed
    text = cmake("--build", str(build_dir), cwd=ROOT)
    assert "kvplan: building tiny-llama/fp32" in text and "nothing to do" in text
