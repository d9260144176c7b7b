"""Bad input a new user gives the command line: one line naming the file, exit 2, nothing written."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from kvplan.cli import build_main

ROOT = Path(__file__).resolve().parent.parent


def surgery_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "surgery", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_a_corrupt_onnx_file_given_to_surgery_is_named(tmp_path):
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07this is no protobuf" * 10)
    r = surgery_cli(str(bad), "-o", str(tmp_path / "out.onnx"))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"error: {bad}: not a readable ONNX model") and "Traceback" not in r.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_a_graph_with_no_decoder_in_it_is_refused_not_written(tmp_path):
    """A one-node Add graph: every pass finds nothing. Saying so beats writing it back with only its
    opset raised."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])
    graph = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "add", [x], [y])
    path = tmp_path / "add.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    r = surgery_cli(str(path), "-o", str(tmp_path / "out.onnx"))
    assert r.returncode == 2 and "no decoder pattern found" in r.stderr and str(path) in r.stderr
    assert not (tmp_path / "out.onnx").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through read-only modes; the test makes the "
                                              "directory unwritable another way below")
def test_a_read_only_out_is_one_line_as_user(tmp_path, capsys):
    out = tmp_path / "ro"
    out.mkdir(mode=0o555)
    assert build_main(["--model", "tiny-llama", "--profile", "fp32", "--out", str(out), "--stop-after", "export"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Permission denied" in err and len(err.strip().splitlines()) == 1


def test_an_out_that_cannot_be_created_is_one_line(tmp_path, capsys):
    """--out under a regular file: mkdir fails whoever runs it (root included)."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    assert build_main(["--model", "tiny-llama", "--profile", "fp32", "--out", str(blocker / "out"),
                       "--stop-after", "export"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(blocker) in err and len(err.strip().splitlines()) == 1
