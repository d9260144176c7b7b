"""The files a build writes: every one through kvplan.fileio's atomic writers, so a killed build
leaves only marked temporaries the next build removes, every finished file has the mode the
umask gives, and a full disk is reported naming the file. Also the surgery command's own files:
an empty input, an output that is the input, an output directory that does not exist."""
from __future__ import annotations

import errno
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import kvplan.export.exporter as exporter
import kvplan.quantize.weights as weights
from kvplan.cli import build_main
from kvplan.errors import WriteError
from kvplan.fileio import TEMP_MARK, atomic_file, temp_prefix
from kvplan.quantize.weights import Quantized
from kvplan.surgery.cli import main as surgery_main
from kvplan.validate import stream

ROOT = Path(__file__).resolve().parent.parent


def _everything(directory: Path) -> list[str]:
    """Every file and directory under ``directory``, relative to it."""
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


def _export_only(out: Path) -> int:
    return build_main(["--model", "tiny-llama", "--profile", "fp32", "--out", str(out), "--stop-after", "export"])


# A process that writes 100 MB of quantized weights into a target and SIGKILLs itself as soon as
# any file appears under it: what kill -9 during the quantize stage leaves.
_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    import torch
    from kvplan.quantize.weights import Quantized

    target = Path(sys.argv[1])
    before = {p for p in target.rglob("*")}

    def watch():
        while True:
            if any(p.is_file() for p in target.rglob("*") if p not in before):
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(0.0005)

    threading.Thread(target=watch, daemon=True).start()
    Quantized(replaced={"big": torch.ones(25_000_000)}).save(target / "quantized.safetensors")
    time.sleep(5)       # the watcher kills before this ends
""")


def test_the_next_build_removes_what_a_kill_during_the_quantized_weights_write_left(tmp_path, capsys):
    out = tmp_path / "out"
    target = out / "tiny-llama" / "fp32"
    assert _export_only(out) == 0
    kept = _everything(target)
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(target)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert _everything(target) != kept, "the kill left nothing to clean (it came too late)"
    capsys.readouterr()
    assert _export_only(out) == 0
    assert _everything(target) == kept
    assert "removed" in capsys.readouterr().out


def test_the_quantized_weights_writer_makes_no_temporary_but_marked_ones(tmp_path, monkeypatch):
    """While safetensors writes (its own temporary file included) the directory holds nothing a
    rerun would not recognise as a leftover; afterwards only the final file."""
    seen: list[str] = []
    real = weights.safetensors_torch.save_file

    def save_and_look(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)
        seen.extend(p.name for p in tmp_path.iterdir())

    monkeypatch.setattr("safetensors.torch.save_file", save_and_look)
    Quantized(replaced={"norm.weight": torch.ones(64)}).save(tmp_path / "quantized.safetensors")
    assert seen and all(TEMP_MARK in name for name in seen), seen
    assert _everything(tmp_path) == ["quantized.safetensors"]


def test_temporaries_a_killed_build_left_in_its_validation_directory_are_removed_by_the_next_build(tmp_path):
    """Validation writes its Polygraphy files and its scratch directories under validation/; a kill
    there leaves them where the next build must look too."""
    out = tmp_path / "out"
    target = out / "tiny-llama" / "fp32"
    assert _export_only(out) == 0
    kept = _everything(target)
    vdir = target / "validation"
    vdir.mkdir()
    inputs = vdir / "decoder.prefill.inputs.json"
    (vdir / f"{temp_prefix(inputs)}4242").write_text("[\n")
    spill = vdir / f"{temp_prefix(Path('spill'))}abc123" / "decoder.prefill" / "pytorch"
    spill.mkdir(parents=True)
    (spill / "0.npy").write_bytes(b"\x93NUMPY")
    (target / f"{temp_prefix(target / 'decoder.onnx')}77").mkdir()
    assert _export_only(out) == 0
    assert _everything(target) == sorted(kept + ["validation"])


def _modes(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_mode & 0o777 for p in directory.rglob("*") if p.is_file()}


def test_every_file_a_build_writes_has_the_mode_the_umask_gives(tmp_path, backend):
    """Export, int4 weights and graph, surgery, plan, manifest, validation's Polygraphy files: under
    umask 027 each is 0640 (mkstemp's, safetensors' and onnx's temporaries are created 0600)."""
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "build.engines", "--model", "tiny-llama", "--profile", "int4-awq",
                        "--out", str(out), "--validate"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       umask=0o027)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    modes = _modes(out / "tiny-llama" / "int4-awq")
    assert {"quantized.safetensors", "decoder.int4.onnx", "decoder.plan", "manifest.json"} <= set(modes)
    assert any(name.startswith("validation/") for name in modes)
    assert {name: mode for name, mode in modes.items() if mode != 0o640} == {}


def test_a_full_disk_during_the_export_is_one_line_naming_the_file_and_its_directory(tmp_path, monkeypatch,
                                                                                     capsys):
    def fills_up(model, path):
        with open(path, "wb") as f:
            f.write(b"\x08\x0a" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(exporter, "save_streamed", fills_up)
    out = tmp_path / "out"
    target = out / "tiny-llama" / "fp32"
    assert _export_only(out) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"error: {target / 'decoder.onnx'}: ") and "No space left on device" in err
    assert f"directory {target}" in err
    assert not (target / "decoder.onnx").exists()
    assert [name for name in _everything(target) if TEMP_MARK in name] == []


def test_a_full_disk_under_an_atomic_file_names_it_and_removes_the_temporary(tmp_path):
    path = tmp_path / "manifest.json"
    with pytest.raises(WriteError) as caught:
        with atomic_file(path) as f:
            f.write(b"{")
            raise OSError(errno.ENOSPC, "No space left on device")
    assert str(path) in str(caught.value) and f"directory {tmp_path}" in str(caught.value)
    assert caught.value.errno == errno.ENOSPC
    assert _everything(tmp_path) == []


def test_a_full_disk_while_validation_spills_a_runner_output_names_the_file(tmp_path, monkeypatch):
    """numpy reports a short write as OSError("N requested and M written"), naming no file."""
    def short_write(path, array, allow_pickle=False):
        raise OSError("3145728 requested and 524224 written")

    monkeypatch.setattr(np, "save", short_write)
    with pytest.raises(WriteError) as caught:
        stream._spill(tmp_path / "spill", {"hidden_out": np.zeros((1, 4, 8), np.float32)})
    assert str(tmp_path / "spill" / "0.npy") in str(caught.value) and "524224 written" in str(caught.value)


@pytest.fixture
def decoder_onnx(export_tiny, tmp_path) -> Path:
    """A copy of an exported decoder the test may lose."""
    (pack,) = export_tiny("tiny-llama")
    path = tmp_path / "build" / "decoder.onnx"
    path.parent.mkdir()
    shutil.copy(pack.path, path)
    return path


def test_surgery_refuses_an_empty_onnx_file_naming_it(tmp_path, capsys):
    empty = tmp_path / "decoder.onnx"
    empty.write_bytes(b"")
    assert surgery_main([str(empty), "-o", str(tmp_path / "fused.onnx")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {empty}: not an ONNX model") and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "fused.onnx").exists()


@pytest.mark.parametrize("how", ["same path", "relative path", "symlink"])
def test_surgery_refuses_to_write_over_its_input(decoder_onnx, tmp_path, monkeypatch, capsys, how):
    before = decoder_onnx.read_bytes()
    if how == "same path":
        output = decoder_onnx
    elif how == "relative path":
        monkeypatch.chdir(tmp_path)
        output = Path("build") / ".." / "build" / "decoder.onnx"
    else:
        output = tmp_path / "link.onnx"
        output.symlink_to(decoder_onnx)
    assert surgery_main([str(decoder_onnx), "-o", str(output)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: -o {output}: is the input file") and len(err.strip().splitlines()) == 1, err
    assert decoder_onnx.read_bytes() == before


def test_surgery_refuses_an_output_whose_directory_does_not_exist(decoder_onnx, tmp_path, capsys):
    missing = tmp_path / "nonexistent"
    assert surgery_main([str(decoder_onnx), "-o", str(missing / "x.onnx")]) == 2
    err = capsys.readouterr().err
    assert f"its directory {missing} does not exist" in err and len(err.strip().splitlines()) == 1, err
    assert not missing.exists()
