"""The wheel installs kvplan and nothing else, beside PyPA's build, and carries its profiles.

One end-to-end test in a fresh virtual environment: the source tree is copied (so the build
never writes into this checkout), built into a wheel twice, installed next to PyPA's
``build``, and run from another directory. The test environment's own packages (torch,
onnx, ...) are made visible after the new environment's own ones by a .pth line, so
nothing heavy is installed again; PyPA's build and the build backend come from the
package index, as a user's would.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

# About 90 s on 2 cores and it needs the package index (PyPA build, the build backend).
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
IGNORED = shutil.ignore_patterns(".git", ".venv", "venv", "engines", "__pycache__", "*.egg-info",
                                 ".setuptools-build", ".pytest_cache", "dist", ".whl")


def _run(cmd, cwd, env=None, check=True):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
    return r


def _wheel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return sorted(n for n in z.namelist() if ".dist-info/" not in n)


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory):
    base = tmp_path_factory.mktemp("pkg")
    src = base / "src"
    shutil.copytree(ROOT, src, ignore=IGNORED)
    venv = base / "venv"
    _run([sys.executable, "-m", "venv", venv], cwd=base)
    py = venv / "bin" / "python"
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=base).stdout.strip())
    (site / "zz-test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([py, "-m", "pip", "install", "-q", "build"], cwd=base)
    wheels = []
    for i in range(2):
        out = base / f"wheels{i}"
        _run([py, "-m", "pip", "wheel", "-q", "--no-deps", "-w", out, src], cwd=base)
        [wheel] = out.glob("kvplan-*.whl")
        wheels.append(wheel)
    _run([py, "-m", "pip", "install", "-q", "--no-deps", wheels[0]], cwd=base)
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    return {"base": base, "venv": venv, "py": py, "wheels": wheels, "env": env}


def test_two_wheel_builds_in_a_row_hold_the_same_files(fresh_venv):
    first, second = (_wheel_files(w) for w in fresh_venv["wheels"])
    assert first == second


def test_the_wheel_carries_kvplan_and_its_profiles_only(fresh_venv):
    files = _wheel_files(fresh_venv["wheels"][0])
    tops = {f.split("/")[0] for f in files}
    assert tops == {"kvplan"}, f"top-level entries besides kvplan: {sorted(tops - {'kvplan'})}"
    assert "kvplan/profiles/fp16.toml" in files and "kvplan/cli.py" in files
    assert "kvplan/validate/validation_text.txt" in files


def test_installing_kvplan_leaves_pypa_build_working(fresh_venv):
    r = _run([fresh_venv["py"], "-m", "build", "--version"], cwd=fresh_venv["base"], env=fresh_venv["env"])
    assert "build" in r.stdout


def test_console_script_runs_from_any_directory_and_finds_its_profiles(fresh_venv, tmp_path):
    kvplan = fresh_venv["venv"] / "bin" / "kvplan"
    env = fresh_venv["env"]
    assert "build" in _run([kvplan, "--help"], cwd=tmp_path, env=env).stdout
    r = _run([kvplan, "build", "--profile", "fp16", "--model", "tiny-llama", "--stop-after", "export",
              "--out", tmp_path / "out"], cwd=tmp_path, env=env)
    assert (tmp_path / "out" / "tiny-llama" / "fp16" / "decoder.onnx").is_file(), r.stdout
    where = _run([fresh_venv["py"], "-c", "import kvplan.profiles as p; print(p.PROFILES_DIR)"], cwd=tmp_path, env=env)
    assert str(fresh_venv["venv"]) in where.stdout, "profiles were not found inside the installed package"
