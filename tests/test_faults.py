"""Faults during a build, for real: a full disk under the plan, Ctrl-C in the engine build, kill -9.

Whatever happens, no artifact carries its final name unless it is whole, the manifest never
claims an unfinished stage, and the next build of the target removes what a killed one left.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import kvplan.trt.build as trt_build
from kvplan import profiles
from kvplan.decoder import pack_specs
from kvplan.errors import BuildError
from kvplan.export import export_pack, io_contract
from kvplan.fileio import TEMP_MARK
from kvplan.models import resolve

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    src = resolve("tiny-llama")
    spec = pack_specs(src.config, 0)[0]
    onnx_path = tmp_path_factory.mktemp("faults") / "decoder.onnx"
    export_pack(src, spec, "float32", 1, onnx_path)
    profile = profiles.load("fp32")
    return {"onnx": onnx_path, "profile": profile, "contract": io_contract(src.config, spec, 1, "float32")}


class FullDisk:
    """A file whose device fills up after ``room`` bytes: write raises ENOSPC, or (``short``) writes
    what fits and returns the count, as a raw write(2) does."""

    def __init__(self, f, room: int, short: bool = False):
        self.f, self.room, self.short = f, room, short

    def write(self, data) -> int:
        data = bytes(data)
        if len(data) <= self.room:
            self.room -= len(data)
            return self.f.write(data)
        if not self.short:
            raise OSError(errno.ENOSPC, "No space left on device")
        n = self.f.write(data[:self.room])
        self.room = 0
        return n

    def __getattr__(self, name):
        return getattr(self.f, name)


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".plan" or TEMP_MARK in p.name)


@pytest.mark.parametrize("short", [False, True], ids=["write-raises", "short-write"])
def test_a_plan_the_disk_could_not_hold_never_carries_its_name(tiny, tmp_path, monkeypatch, short, backend):
    real = trt_build.atomic_file

    @contextlib.contextmanager
    def filling_up(path):
        with real(path) as f:
            yield FullDisk(f, room=64 * 1024, short=short)

    monkeypatch.setattr(trt_build, "atomic_file", filling_up)
    with pytest.raises((OSError, BuildError)) as caught:
        trt_build.build_engine(tiny["onnx"], tmp_path / "decoder.plan", tiny["profile"], tiny["contract"],
                               backend, None, log=lambda *_: None)
    assert "No space left" in str(caught.value) or "not written whole" in str(caught.value)
    assert _leftovers(tmp_path) == []


def _start_build(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "build.engines", "--model", "tiny-llama", "--profile", "fp32",
                             "--out", str(out), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _wait_for(proc: subprocess.Popen, marker: str, seen: list[str], timeout: float = 240) -> None:
    end = time.monotonic() + timeout
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            return
        assert time.monotonic() < end, f"no {marker!r} within {timeout} s:\n{''.join(seen)}"
    raise AssertionError(f"the build ended before {marker!r}:\n{''.join(seen)}")


@pytest.mark.slow  # a real signal to a real build in a subprocess: about 25 s each
def test_ctrl_c_during_the_engine_build_cancels_it_and_exits_130(tmp_path, backend):
    proc = _start_build(tmp_path / "out")
    seen: list[str] = []
    _wait_for(proc, "[engines] building", seen)
    _wait_for(proc, "[build]", seen)          # the builder is running
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=240)
    log = "".join(seen) + rest
    assert proc.returncode == 130, log
    assert "interrupted" in log and "wrote " not in log
    target = tmp_path / "out" / "tiny-llama" / "fp32"
    assert _leftovers(target) == []
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["status"] != "complete" and "engines" not in manifest["stages"]


@pytest.mark.slow  # a real signal to a real build in a subprocess: about 25 s each
def test_the_next_build_removes_what_a_killed_build_left(tmp_path, backend):
    """kill -9 while the plan's temporary file is being written; the rebuild removes it."""
    target = tmp_path / "out" / "tiny-llama" / "fp32"
    proc = _start_build(tmp_path / "out")
    seen: list[str] = []
    _wait_for(proc, "[engines] building", seen)
    end = time.monotonic() + 120
    while not list(target.glob(f".decoder.plan{TEMP_MARK}*")):
        assert proc.poll() is None and time.monotonic() < end, "the plan's temporary file never appeared"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    left = [p.name for p in target.iterdir() if TEMP_MARK in p.name]
    assert left, "the kill left nothing to clean (it came too late)"
    rerun = _start_build(tmp_path / "out", "--stop-after", "surgery")
    out, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, out
    assert "removed 1 temporary file(s)" in out or "removed" in out
    assert not [p.name for p in target.iterdir() if TEMP_MARK in p.name]
