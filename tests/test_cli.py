"""The pipeline CLI: bad input fails fast and leaves nothing behind; rebuilds are incremental."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kvplan import target as engines
from kvplan.cli import build_main as main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def files_under(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """tiny-llama exported once with the fp32 profile (export stage only)."""
    out = tmp_path_factory.mktemp("cli")
    assert main(["--model", "tiny-llama", "--profile", "fp32", "--out", str(out), "--stop-after", "export"]) == 0
    return out


def test_unknown_preset(tmp_path, capsys):
    code, _, err = run(capsys, "--model", "no-such-model", "--out", str(tmp_path), "--stop-after", "export")
    assert code == 2 and "unknown model 'no-such-model'" in err
    assert files_under(tmp_path) == []


def test_unknown_profile_dtype_names_file_and_field(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text((engines.profiles_mod.PROFILES_DIR / "fp16.toml").read_text().replace('"float16"', '"float8"'))
    code, _, err = run(capsys, "--model", "tiny-llama", "--profile", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{bad}: export.dtype: unknown dtype 'float8'" in err
    assert files_under(tmp_path / "o") == []


def test_directory_without_config(tmp_path, capsys):
    code, _, err = run(capsys, "--model", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "no config.json" in err


def test_manifest_lists_artifacts_and_inputs(built):
    manifest = json.loads((built / "tiny-llama" / "fp32" / "manifest.json").read_text())
    assert manifest["status"] == "complete"
    export = manifest["stages"]["export"]
    [entry] = export["artifacts"]
    assert entry["path"] == "decoder.onnx" and len(entry["sha256"]) == 64
    assert entry["io"]["inputs"]["past_key_in0"]["shape"] == [1, 2, "lastSum", 16]
    assert export["inputs"]["model"]["preset"] == "tiny-llama" and export["inputs"]["dtype"] == "float32"


def test_second_run_rebuilds_nothing(built, capsys):
    onnx = built / "tiny-llama" / "fp32" / "decoder.onnx"
    before = onnx.stat().st_mtime_ns
    code, out, _ = run(capsys, "--model", "tiny-llama", "--profile", "fp32", "--out", str(built), "--stop-after", "export")
    assert code == 0 and "[export] up to date" in out and "nothing to do" in out
    assert onnx.stat().st_mtime_ns == before


def test_modified_artifact_is_rebuilt(built, capsys):
    onnx = built / "tiny-llama" / "fp32" / "decoder.onnx"
    onnx.write_bytes(onnx.read_bytes() + b"\0")
    code, out, _ = run(capsys, "--model", "tiny-llama", "--profile", "fp32", "--out", str(built), "--stop-after", "export")
    assert code == 0 and "[export] building" in out


def test_interrupted_export_leaves_no_artifact_and_no_claim(tmp_path, capsys, monkeypatch):
    def exploding_export(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("kvplan.export.exporter.export_pack", exploding_export)
    code, _, err = run(capsys, "--model", "tiny-llama", "--profile", "fp32", "--out", str(tmp_path), "--stop-after", "export")
    assert code == 130 and "interrupted" in err
    target = tmp_path / "tiny-llama" / "fp32"
    manifest = json.loads((target / "manifest.json").read_text())
    assert manifest["status"] == "building" and "export" not in manifest["stages"]
    assert not list(target.glob("*.onnx"))


def test_failed_save_leaves_no_temporary_files(tmp_path, monkeypatch):
    """export_pack writes to a temporary directory and renames: a failure halfway through the
    file leaves nothing."""
    import kvplan.export.exporter as exporter
    from kvplan.decoder import pack_specs
    from kvplan.export.exporter import export_pack
    from kvplan.models import resolve

    def broken_write(head, tensors, f):
        f.write(b"the first bytes of a model")
        raise OSError("disk full")

    monkeypatch.setattr(exporter, "write_streamed", broken_write)
    source = resolve("tiny-llama")
    with pytest.raises(OSError, match="disk full"):
        export_pack(source, pack_specs(source.config, 0)[0], "float32", 1, tmp_path / "decoder.onnx")
    assert files_under(tmp_path) == []


def test_list_presets(capsys):
    code, out, _ = run(capsys, "--list-presets")
    assert code == 0 and "minicpmo26-tts" in out and "tiny-qwen3" in out


def test_concurrent_build_of_the_same_target_waits_for_the_first(tmp_path):
    import fcntl
    import threading
    import time

    from kvplan.manifest import target_lock

    tmp_path.mkdir(exist_ok=True)
    holder = open(tmp_path / ".kvplan.lock", "a+")
    fcntl.flock(holder, fcntl.LOCK_EX)          # a first build holds the target
    holder.write("4242")
    holder.flush()
    threading.Timer(1.0, lambda: fcntl.flock(holder, fcntl.LOCK_UN)).start()
    messages = []
    t0 = time.perf_counter()
    with target_lock(tmp_path, log=messages.append):
        waited = time.perf_counter() - t0
    holder.close()
    assert waited >= 0.9
    assert messages == [f"another build of {tmp_path} is running (pid 4242); waiting for it to finish"]


def test_unknown_surgery_pass_is_refused_when_the_profile_loads(tmp_path, capsys):
    bad = tmp_path / "typo.toml"
    bad.write_text((engines.profiles_mod.PROFILES_DIR / "fp16.toml").read_text()
                   .replace('passes = ["rmsnorm", "rope", "attention", "gqa", "residual2d"]', 'passes = ["rmsnorm", "rop"]'))
    code, out, err = run(capsys, "--model", "tiny-llama", "--profile", str(bad), "--out", str(tmp_path / "o"))
    assert code == 2 and f"{bad}: surgery.passes: unknown pass 'rop'" in err
    assert "[export]" not in out and files_under(tmp_path / "o") == []


def test_backend_and_engine_errors_are_one_line_and_exit_2(tmp_path, capsys):
    """--inspect on a file that is no plan: BackendError where full TensorRT is not importable (as
    here), BuildError where it is; either way one line, no traceback."""
    (tmp_path / "x.plan").write_bytes(b"not a plan")
    code, _, err = run(capsys, "--backend", "tensorrt", "--inspect", str(tmp_path / "x.plan"))
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1


def test_kvplan_command_lists_its_commands_and_refuses_unknown_ones(capsys):
    from kvplan.cli import main as kvplan_main
    assert kvplan_main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(c in listing for c in ("build", "validate", "surgery", "inspect", "presets"))
    assert kvplan_main(["bild"]) == 2 and "unknown command 'bild'" in capsys.readouterr().err


def test_a_bad_shapes_override_is_refused_before_anything_is_built(tmp_path, capsys):
    code, _, err = run(capsys, "--model", "tiny-llama", "--profile", "fp32", "--out", str(tmp_path),
                       "--shapes", "prefill:N=0,4,8")
    assert code == 2 and "--shapes: prefill.N: min 0 must be >= 1" in err
    assert files_under(tmp_path) == []


def test_shapes_override_reaches_the_manifest(tmp_path, capsys):
    code, out, _ = run(capsys, "--model", "tiny-llama", "--profile", "fp32", "--out", str(tmp_path),
                       "--stop-after", "export", "--shapes", "decode:lastSum=1,8,64")
    assert code == 0 and "decode: N [1, 1, 2], lastSum [1, 8, 64] (--shapes)" in out
    manifest = json.loads((tmp_path / "tiny-llama" / "fp32" / "manifest.json").read_text())
    decode = {s["name"]: s for s in manifest["profile"]["engine"]["shapes"]}["decode"]
    assert decode["lastSum"] == {"min": 1, "opt": 8, "max": 64}
