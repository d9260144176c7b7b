"""The trace cache: a rebuild of an architecture already traced skips the trace and writes the
same bytes; a damaged entry costs a trace, never a build."""
from __future__ import annotations

import json

import pytest
import torch

import kvplan.export.stitch as stitch
from kvplan.cli import build_main as main
from kvplan.decoder import pack_specs
from kvplan.export.exporter import export_pack
from kvplan.export.trace_cache import TraceCache
from kvplan.models import resolve


@pytest.fixture
def no_memory(monkeypatch):
    """Forget the pieces this process already traced, so only the disk cache can supply them."""
    monkeypatch.setattr(stitch, "_PIECES", {})


def export(tmp_path, name, cache, preset="tiny-qwen2", dtype="float32", kv_io="concat"):
    source = resolve(preset)
    [spec] = pack_specs(source.config, 0, 0, kv_io, 64 if kv_io == "inplace" else None)
    path = tmp_path / name / "decoder.onnx"
    export_pack(source, spec, dtype, 1, path, log=None, trace_cache=cache)
    return path


def test_a_rebuild_loads_every_piece_and_writes_the_same_bytes(tmp_path, no_memory, monkeypatch):
    cache = TraceCache(tmp_path / "cache")
    cold = export(tmp_path, "cold", cache)
    assert sorted(cache.stored) == ["layer", "norm", "rotary"] and not cache.hits
    monkeypatch.setattr(stitch, "_PIECES", {})
    monkeypatch.setattr(stitch, "trace", lambda *a, **k: pytest.fail("traced although every piece was cached"))
    warm_cache = TraceCache(tmp_path / "cache")
    warm = export(tmp_path, "warm", warm_cache)
    assert sorted(warm_cache.hits) == ["layer", "norm", "rotary"]
    assert warm.read_bytes() == cold.read_bytes()


@pytest.mark.slow  # the concat round trip runs by default (test_a_rebuild_loads_every_piece...)
def test_the_inplace_layer_round_trips_with_its_opset_24_scatter(tmp_path, no_memory, monkeypatch):
    cold = export(tmp_path, "cold", TraceCache(tmp_path / "cache"), kv_io="inplace")
    monkeypatch.setattr(stitch, "_PIECES", {})
    warm = export(tmp_path, "warm", TraceCache(tmp_path / "cache"), kv_io="inplace")
    assert warm.read_bytes() == cold.read_bytes()


def test_the_layer_entry_holds_no_checkpoint_weights(tmp_path, no_memory):
    import onnx
    cache = TraceCache(tmp_path / "cache")
    export(tmp_path, "a", cache)
    entries = {p.name.split("-")[0]: onnx.load(p) for p in cache.directory.glob("*.onnx")}
    stored = {k: [t.name for t in m.graph.initializer if t.name.startswith("kvplan.cached_value/")]
              for k, m in entries.items()}
    assert stored == {"layer": [], "rotary": ["kvplan.cached_value/inv_freq"], "norm": []}


@pytest.mark.slow  # several cold traces: about 20 s each
def test_entries_are_keyed_by_dtype_and_cache_layout(tmp_path, no_memory):
    cache = TraceCache(tmp_path / "cache")
    export(tmp_path, "fp32", cache)
    export(tmp_path, "fp16", cache, dtype="float16")
    export(tmp_path, "inplace", cache, kv_io="inplace")
    # Three pieces per trace, one trace per key.
    assert sorted(p.name.split("-")[0] for p in cache.directory.glob("*.onnx")) == ["layer"] * 3 + ["norm"] * 3 + ["rotary"] * 3


@pytest.mark.slow  # every piece traced twice
def test_a_damaged_entry_is_reported_and_every_piece_traced_again(tmp_path, no_memory, monkeypatch):
    """Pieces are traced together or not at all: the tracer's names depend on what it traced
    alongside, so a partly cached export would not be the cold export's bytes."""
    cache = TraceCache(tmp_path / "cache")
    cold = export(tmp_path, "cold", cache)
    [layer] = cache.directory.glob("layer-*.onnx")
    layer.write_bytes(b"\x08garbage")
    monkeypatch.setattr(stitch, "_PIECES", {})
    again = TraceCache(tmp_path / "cache")
    notes = []
    source = resolve("tiny-qwen2")
    [spec] = pack_specs(source.config, 0)
    export_pack(source, spec, "float32", 1, tmp_path / "again" / "decoder.onnx", log=notes.append, trace_cache=again)
    assert sorted(again.stored) == ["layer", "norm", "rotary"]
    assert any(str(layer) in n and "unreadable trace cache entry" in n for n in notes)
    assert (tmp_path / "again" / "decoder.onnx").read_bytes() == cold.read_bytes()
    monkeypatch.setattr(stitch, "_PIECES", {})
    key = (source.config, torch.float32, 1, 0, "concat")
    assert TraceCache(tmp_path / "cache").load_set(key, ["rotary", "layer", "norm"]) is not None


@pytest.mark.slow  # several cold traces: about 20 s each
def test_an_export_after_another_layout_is_the_cold_exports_bytes(tmp_path, no_memory, monkeypatch):
    """The rotary piece is shared between layouts; reusing it must not change the inplace graph."""
    export(tmp_path, "concat", None)
    after = export(tmp_path, "after", None, kv_io="inplace")
    monkeypatch.setattr(stitch, "_PIECES", {})
    assert export(tmp_path, "alone", None, kv_io="inplace").read_bytes() == after.read_bytes()


@pytest.mark.slow  # a cold trace and a cached rebuild through the CLI
def test_the_cli_uses_the_cache_and_records_it(tmp_path, no_memory, monkeypatch, capsys):
    monkeypatch.setenv("KVPLAN_CACHE_DIR", str(tmp_path / "cache"))
    args = ["--model", "tiny-llama", "--profile", "fp32", "--stop-after", "export"]
    assert main(args + ["--out", str(tmp_path / "a")]) == 0
    monkeypatch.setattr(stitch, "_PIECES", {})
    assert main(args + ["--out", str(tmp_path / "b")]) == 0
    assert "pieces rotary, layer, norm: loaded from the trace cache" in capsys.readouterr().out
    record = json.loads((tmp_path / "b/tiny-llama/fp32/manifest.json").read_text())["stages"]["export"]["trace_cache"]
    assert record["dir"] == str(tmp_path / "cache" / "traces")
    assert sorted(record["hits"]) == ["layer", "norm", "rotary"] and record["stored"] == []


@pytest.mark.slow  # two cold traces
def test_no_trace_cache_neither_reads_nor_writes_it(tmp_path, no_memory, monkeypatch):
    monkeypatch.setenv("KVPLAN_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["--model", "tiny-llama", "--profile", "fp32", "--stop-after", "export", "--out", str(tmp_path / "a"),
                 "--no-trace-cache"]) == 0
    assert not (tmp_path / "cache").exists()
    record = json.loads((tmp_path / "a/tiny-llama/fp32/manifest.json").read_text())["stages"]["export"]["trace_cache"]
    assert record == "off (--no-trace-cache)"


@pytest.mark.slow  # cold traces of two layouts
def test_a_rebuild_after_another_layout_writes_the_first_builds_bytes(tmp_path, no_memory, monkeypatch):
    """Pieces are keyed by the whole layout: an inplace export in between, whose rotary and norm
    compute the same thing, must not change what the concat rebuild loads."""
    cache = TraceCache(tmp_path / "cache")
    first = export(tmp_path, "first", cache)
    monkeypatch.setattr(stitch, "_PIECES", {})
    export(tmp_path, "between", cache, kv_io="inplace")
    monkeypatch.setattr(stitch, "_PIECES", {})
    assert export(tmp_path, "again", cache).read_bytes() == first.read_bytes()


@pytest.mark.slow  # several cold traces
def test_a_rebuild_of_several_packs_writes_the_same_bytes(tmp_path, no_memory, monkeypatch):
    """Packs without the final norm use the same trace as the last pack, which has it."""
    source = resolve("tiny-llama")
    specs = pack_specs(source.config, 1)

    def build(name):
        cache = TraceCache(tmp_path / "cache")
        paths = [tmp_path / name / f"decoder.pack{i}.onnx" for i in range(len(specs))]
        for spec, path in zip(specs, paths):
            export_pack(source, spec, "float16", 1, path, log=None, trace_cache=cache)
        return [p.read_bytes() for p in paths], cache

    cold, cold_cache = build("cold")
    assert len(cold) > 1 and sorted(cold_cache.stored) == ["layer", "norm", "rotary"]
    monkeypatch.setattr(stitch, "_PIECES", {})
    warm, warm_cache = build("warm")
    assert not warm_cache.stored and warm == cold
