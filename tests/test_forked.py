"""Stages in a forked process: results and errors come back as if run here; a killed or
interrupted child is reported; the pipeline forks per stage group and never for a no-op."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from kvplan import forked, pipeline
from kvplan.errors import ChildExitError, KvplanError, QuantizeError
from kvplan.forked import run_forked

ROOT = Path(__file__).resolve().parent.parent


def test_the_childs_return_value_comes_back():
    assert run_forked(lambda: {"list": [1, 2]}, "work") == {"list": [1, 2]}
    assert run_forked(os.getpid, "work") != os.getpid()


def test_a_kvplan_error_comes_back_with_its_type_and_message():
    def fail():
        raise QuantizeError("model.gguf: blk.0.attn_q.weight: unknown block type")
    with pytest.raises(QuantizeError, match="blk.0.attn_q.weight: unknown block type"):
        run_forked(fail, "stage 'quantize'")


def test_an_unexpected_error_keeps_its_type_and_the_childs_traceback():
    def fail():
        raise ValueError("a bug")
    with pytest.raises(ValueError, match="a bug") as caught:
        run_forked(fail, "stage 'export'")
    assert "raised in stage 'export''s process" in caught.value.__notes__[0]
    assert "in fail" in caught.value.__notes__[0]


class Unpicklable(Exception):
    def __init__(self, a, b):
        super().__init__(f"{a} and {b}")


def test_an_exception_that_cannot_travel_becomes_a_kvplan_error_naming_it():
    def fail():
        raise Unpicklable(1, 2)
    with pytest.raises(KvplanError, match=r"stage 'export': Unpicklable: 1 and 2"):
        run_forked(fail, "stage 'export'")


def test_a_keyboard_interrupt_in_the_child_is_one_here():
    def interrupted():
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_forked(interrupted, "stage 'engines'")


def test_a_killed_child_is_reported_with_its_signal():
    with pytest.raises(ChildExitError, match=r"stage 'engines': its process was killed by signal 9 \(SIGKILL\) "
                                             r"\(the system may have run out of memory\)"):
        run_forked(lambda: os.kill(os.getpid(), signal.SIGKILL), "stage 'engines'")


def test_a_child_that_exits_without_a_result_is_reported():
    with pytest.raises(ChildExitError, match="exited with status 3 without a result"):
        run_forked(lambda: os._exit(3), "stage 'export'")


def test_no_fork_where_a_library_with_thread_pools_is_loaded(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", object())
    assert not forked.can_fork()


def test_no_fork_outside_the_main_thread():
    answers = []
    worker = threading.Thread(target=lambda: answers.append(forked.can_fork()))
    worker.start()
    worker.join()
    assert answers == [False]


_INTERRUPTED_CHILD = """
import sys, time
from pathlib import Path
from kvplan.forked import run_forked
marker = Path(sys.argv[1])
def work():
    try:
        print("ready", flush=True)
        time.sleep(60)
    finally:
        marker.write_text("cleaned up")      # what a stage's own cleanup does
try:
    run_forked(work, "stage 'engines'")
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_to_the_parent_reaches_the_child_once_and_the_parent_exits_130(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_CHILD, str(marker)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 130
    assert marker.read_text() == "cleaned up"


_KILLED_PARENT = """
import os, sys, time
from kvplan.forked import run_forked
def work():
    print(os.getpid(), flush=True)
    time.sleep(60)
run_forked(work, "stage 'engines'")
"""


def test_sigterm_to_the_parent_ends_the_child_and_then_the_parent(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.terminate()
    assert proc.wait(timeout=30) == -signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)


def test_a_child_dies_with_its_killed_parent(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_PARENT], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    child = int(proc.stdout.readline())
    proc.kill()
    proc.wait()
    end = time.monotonic() + 10
    while time.monotonic() < end:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.kill(child, signal.SIGKILL)
    pytest.fail("the child outlived its killed parent")


@dataclass
class Recording:
    """A stage that records the process it was built in."""
    name: str
    own_process: bool = False
    upstream: str | None = None

    def inputs(self, done):
        return {"upstream": done[self.upstream]["pid"] if self.upstream else None}

    def build(self, done):
        return {"artifacts": [], "pid": os.getpid()}


def stages():
    return [Recording("export"), Recording("surgery", upstream="export"),
            Recording("engines", own_process=True, upstream="surgery")]


def test_stages_are_grouped_before_each_that_asks_for_its_own_process():
    assert [[s.name for s in g] for g in pipeline.stage_groups(stages())] == [["export", "surgery"], ["engines"]]


def test_each_stage_group_is_built_in_a_child_of_its_own(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "can_fork", lambda: True)      # the stages here use no torch
    result = pipeline.Pipeline(tmp_path, {}, log=lambda _: None, fork=True).run(stages())
    pids = {name: record["pid"] for name, record in result["stages"].items()}
    assert pids["export"] == pids["surgery"] != pids["engines"] and os.getpid() not in pids.values()
    assert {record["process"] for record in result["stages"].values()} == {"child"}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["stages"]["engines"]["pid"] == pids["engines"]


def test_a_no_op_run_forks_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "can_fork", lambda: True)
    pipeline.Pipeline(tmp_path, {}, log=lambda _: None, fork=True).run(stages())

    def no_fork(fn, what):
        raise AssertionError(f"forked for {what}")
    monkeypatch.setattr(pipeline, "run_forked", no_fork)
    assert pipeline.Pipeline(tmp_path, {}, log=lambda _: None, fork=True).run(stages())["rebuilt"] == []


def test_a_rebuild_of_the_last_group_alone_forks_for_it_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "can_fork", lambda: True)
    first = pipeline.Pipeline(tmp_path, {}, log=lambda _: None, fork=True).run(stages())
    forks = []
    real = pipeline.run_forked
    monkeypatch.setattr(pipeline, "run_forked", lambda fn, what: forks.append(what) or real(fn, what))
    again = pipeline.Pipeline(tmp_path, {}, log=lambda _: None, fork=True).run(stages(), force=False)
    assert again["rebuilt"] == [] and forks == []
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    del manifest["stages"]["engines"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    rebuilt = pipeline.Pipeline(tmp_path, {}, log=lambda _: None, fork=True).run(stages())
    assert rebuilt["rebuilt"] == ["engines"] and forks == ["stage 'engines'"]
    assert rebuilt["stages"]["export"] == first["stages"]["export"]


def test_a_failing_stage_in_a_child_leaves_the_manifest_claiming_only_what_was_built(tmp_path, monkeypatch):
    monkeypatch.setattr(pipeline, "can_fork", lambda: True)
    broken = stages()

    def fail(done):
        raise QuantizeError("weights.bin: truncated")
    broken[1].build = fail
    with pytest.raises(QuantizeError, match="truncated"):
        pipeline.Pipeline(tmp_path, {}, log=lambda _: None, fork=True).run(broken)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["status"] == "building" and list(manifest["stages"]) == ["export"]


_INTERRUPTED_WHILE_FORKING = """
import os, signal, sys, time
from pathlib import Path
from kvplan.forked import run_forked
marker = Path(sys.argv[1])
# A Ctrl-C that lands while the parent runs its after-fork hooks, as under load it can: Python
# swallows an exception raised in such a hook, so unless the signal waits, it is lost.
os.register_at_fork(after_in_parent=lambda: os.kill(os.getpid(), signal.SIGINT))
def work():
    marker.write_text("started")
    try:
        time.sleep(20)
    finally:
        marker.write_text("cleaned up")
try:
    run_forked(work, "stage 'engines'")
except KeyboardInterrupt:
    sys.exit(130)
"""


def test_ctrl_c_while_the_parent_forks_is_not_lost(tmp_path):
    marker = tmp_path / "marker"
    proc = subprocess.Popen([sys.executable, "-c", _INTERRUPTED_WHILE_FORKING, str(marker)], cwd=ROOT)
    try:
        assert proc.wait(timeout=15) == 130
    finally:
        proc.kill()
    # The child stopped before its work or in it, and then cleaned up; never left running.
    assert not marker.exists() or marker.read_text() == "cleaned up"
