"""Validation in bounded memory: the pieces that make it so, each checked on its own (no build)."""
from __future__ import annotations

import mmap
import time
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from polygraphy.comparator import RunResults
from polygraphy.json import save_json

from kvplan.decoder import StackSpec
from kvplan.export.exporter import causal_mask
from kvplan.models import resolve
from kvplan.validate import points as pts
from kvplan.validate import polyjson
from kvplan.validate.meter import Meter
from kvplan.validate.onnx_stack import OnnxStack
from kvplan.validate.reference import HFReference, slice_decoder
from kvplan.validate.stream import Job, Measure, Streamer


def _feeds():
    g = np.random.default_rng(0)
    return [OrderedDict(hidden_in=g.standard_normal((1, n, 8)).astype(np.float16),
                        position_ids=np.arange(n, dtype=np.int64)[None]) for n in (1, 3)]


def _inputs_file_is_save_jsons(tmp_path, feeds) -> bool:
    save_json(feeds, str(tmp_path / "whole.json"))
    writer = polyjson.inputs_writer(tmp_path / "streamed.json")
    for feed in feeds:
        writer.append(feed)
    writer.close()
    return (tmp_path / "streamed.json").read_bytes() == (tmp_path / "whole.json").read_bytes()


def test_inputs_written_one_feed_at_a_time_are_the_text_save_json_writes(tmp_path):
    assert _inputs_file_is_save_jsons(tmp_path, _feeds())


def test_outputs_written_one_iteration_at_a_time_are_the_text_run_results_save_writes(tmp_path):
    iterations = [polyjson.iteration(f, "onnxrt-fused", 0.25) for f in _feeds()]
    RunResults([("onnxrt-fused", iterations)]).save(str(tmp_path / "whole.json"))
    writer = polyjson.outputs_writer(tmp_path / "streamed.json", "onnxrt-fused")
    for it in iterations:
        writer.append(it)
    writer.close()
    assert (tmp_path / "streamed.json").read_bytes() == (tmp_path / "whole.json").read_bytes()
    loaded = RunResults.load(str(tmp_path / "streamed.json"))
    assert np.array_equal(loaded["onnxrt-fused"][1]["hidden_in"], iterations[1]["hidden_in"])


@pytest.mark.parametrize("chunk", [3 * 7, 3 << 20])
def test_arrays_streamed_a_chunk_at_a_time_are_the_text_save_json_writes(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(polyjson, "CHUNK", chunk)
    g = np.random.default_rng(1)
    feeds = [OrderedDict(a=g.standard_normal((2, 3, 50)).astype(np.float16), b=np.arange(7, dtype=np.int64),
                         c=np.zeros((0, 4), np.float32), d=np.array(True),
                         e=g.standard_normal((6, 5)).T,                 # not C-ordered: Polygraphy's own path
                         f=torch.arange(5, dtype=torch.bfloat16)),
             OrderedDict(a=g.standard_normal(1000).astype(np.float32))]
    assert _inputs_file_is_save_jsons(tmp_path, feeds)


def test_an_aborted_json_file_leaves_nothing_under_its_name(tmp_path):
    writer = polyjson.inputs_writer(tmp_path / "x.json")
    writer.append(_feeds()[0])
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_a_chunked_prefill_is_the_prefill_of_the_whole_prompt(monkeypatch):
    ref = HFReference(resolve("tiny-llama"), torch.float32)
    hidden = torch.randn(1, 40, ref.source.config.hidden_size)
    whole = ref.cache_tensors(ref.prefill(hidden), ref.source.config.num_layers)
    monkeypatch.setattr(pts, "CHUNK_SCORE_BYTES", 4 * 4 * 40 * 16)      # 16-token chunks: three of them
    monkeypatch.setattr(pts, "SDPA_CHUNK", 16)
    chunked = pts.Prefill(lambda layers: ref, ref.source.config, [range(4)], hidden, torch.float32)
    assert len(chunked.past) == len(whole)
    for a, b in zip(chunked.past, whole):
        assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # Points take views of the first lastSum positions, not copies.
    assert chunked.view(1, 0, 7).data_ptr() == chunked.past[2].data_ptr() and chunked.view(1, 0, 7).shape[2] == 7


def test_prefill_chunks_bound_what_the_attention_holds():
    # eager: [B, heads, chunk, length] float32 scores under CHUNK_SCORE_BYTES; sdpa: only the mask
    assert 4 * 12 * pts.prefill_chunk("eager", 1, 12, 4095) * 4095 <= pts.CHUNK_SCORE_BYTES
    assert pts.prefill_chunk("sdpa", 1, 12, 4095) == pts.SDPA_CHUNK
    assert 4 * pts.prefill_chunk("sdpa", 8, 32, 131072) * 8 * 131072 <= pts.CHUNK_SCORE_BYTES


def test_a_prefill_run_a_few_layers_at_a_time_is_the_prefill_of_the_whole_stack(tmp_path):
    """Each range's model holds only its layers and hands the sequence's hidden state to the next;
    the cache is written to disk and read back memory-mapped."""
    source = resolve("tiny-llama")
    ref = HFReference(source, torch.float32)
    hidden = torch.randn(1, 40, source.config.hidden_size)
    whole = ref.cache_tensors(ref.prefill(hidden), source.config.num_layers)
    held = []

    def make(layers):
        part = HFReference(source, torch.float32, layers=layers, norm=False)
        held.append({n.split(".")[1] for n, p in part.decoder.named_parameters() if n.startswith("layers.")
                     and not p.is_meta})
        return part
    ranged = pts.Prefill(make, source.config, [range(0, 1), range(1, 4)], hidden, torch.float16,
                         directory=tmp_path / "cache")
    assert held == [{"0"}, {"1", "2", "3"}]
    for i in range(source.config.num_layers):
        for kind in range(2):
            view = ranged.view(i, kind, 40)
            assert view.dtype == torch.float16
            assert torch.allclose(view.float(), whole[2 * i + kind], atol=2e-3, rtol=2e-3)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir())[:2] == ["layer0.k.npy", "layer0.v.npy"]


def test_the_reference_holds_one_copy_of_the_weights_in_its_dtype():
    source = resolve("tiny-llama")
    ref = HFReference(source, torch.float16)
    params = list(ref.model.parameters())
    assert {p.dtype for p in params} == {torch.float16}
    decoder = dict(ref.model.named_parameters())
    want = source.read_tensors(["layers.1.mlp.up_proj.weight"])["layers.1.mlp.up_proj.weight"]
    assert torch.equal(decoder["layers.1.mlp.up_proj.weight"], want.to(torch.float16))
    # Rotary frequencies stay float32 (rounding them would be a bug of the reference).
    assert all(b.dtype == torch.float32 for n, b in ref.model.named_buffers() if n.endswith("inv_freq"))


def test_each_phase_reports_its_cpu_time_apart_from_its_wall_time():
    """On a shared machine the wall time depends on the other jobs; the CPU time is the process's own."""
    meter = Meter()
    with meter.phase("busy"):
        start = time.process_time()
        while time.process_time() - start < 0.2:
            pass
    with meter.phase("waiting"):
        time.sleep(0.2)
    busy, waiting = meter.phases
    assert busy.cpu_seconds >= 0.2 and waiting.cpu_seconds < 0.1 <= waiting.seconds
    assert busy.to_dict()["cpu_seconds"] >= 0.2


def _touch_and_release(size: int) -> None:
    """Make ``size`` bytes resident, then give them back to the OS.

    An anonymous mapping, not a bytearray: malloc may keep a freed block resident, and the
    next phase would then rightly count it.
    """
    block = mmap.mmap(-1, size)
    for offset in range(0, size, mmap.PAGESIZE):
        block[offset] = 1
    block.close()


def test_each_phase_reports_its_own_peak():
    meter = Meter()
    with meter.phase("big"):
        _touch_and_release(64 << 20)
    with meter.phase("small"):
        pass
    big, small = meter.phases
    if big.peak is not None:
        assert big.peak - small.peak > 48 << 20
        assert meter.peak >= big.peak


def test_a_discarded_phase_is_not_reported_but_its_memory_counts_in_the_peak():
    """A runner that cannot start (ONNX Runtime on a bf16 graph) has no phase of its own."""
    meter = Meter()
    with meter.phase("could not start") as phase:
        _touch_and_release(64 << 20)
        phase.discard()
    with meter.phase("ran"):
        pass
    assert [p.name for p in meter.phases] == ["ran"]
    if meter.phases[0].peak is not None:
        assert meter.peak - meter.phases[0].peak > 48 << 20


def test_onnx_runtime_at_the_basic_level_computes_what_the_folded_level_does(export_tiny):
    """Validation sessions run the fp16 weights' casts per inference (basic level, the weights held
    once); the task check, eval and generate fold them once (default level): the same graph, the same numbers up to
    fp16 rounding."""
    (pack,) = export_tiny("tiny-llama", "float16")
    cfg = resolve("tiny-llama").config
    g = np.random.default_rng(0)
    hidden = g.standard_normal((1, 3, cfg.hidden_size)).astype(np.float16)
    past = [g.standard_normal((1, cfg.num_kv_heads, 5, cfg.head_dim)).astype(np.float16)
            for _ in range(2 * cfg.num_layers)]
    mask, pos = causal_mask(1, 3, 5, torch.float16).numpy(), np.arange(5, 8)[None]
    basic = OnnxStack([pack]).step(hidden, mask, pos, past)
    folded = OnnxStack([pack], fold_casts=True).step(hidden, mask, pos, past)
    for a, b in zip([basic[0]] + basic[1], [folded[0]] + folded[1]):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=1e-2, rtol=1e-2)


def test_a_reference_of_some_layers_holds_only_theirs_and_computes_what_the_whole_one_does():
    source = resolve("tiny-llama")
    whole = HFReference(source, torch.float32)
    part = HFReference(source, torch.float32, layers=range(1, 3), norm=False)
    real = {n for n, p in part.model.named_parameters() if not p.is_meta and p.numel()}
    assert real == {n for n in dict(whole.model.named_parameters()) if n.startswith(("layers.1.", "layers.2."))}
    cfg = source.config
    hidden = torch.randn(1, 5, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    mask, pos = causal_mask(1, 5, 0, torch.float32), torch.arange(5)[None]
    with torch.no_grad():
        states = whole.decoder(inputs_embeds=hidden, attention_mask=mask, position_ids=pos,
                               output_hidden_states=True).hidden_states
        # hidden_states[i] enters layer i: layers 1..2 take states[1] to states[3].
        got = slice_decoder(part.decoder, 1, 3, False)(inputs_embeds=states[1], attention_mask=mask,
                                                       position_ids=pos).last_hidden_state
    want = states[3]
    torch.testing.assert_close(got, want)


def test_a_reference_computing_in_float32_takes_the_profile_dtypes_weights():
    source = resolve("tiny-llama")
    ref = HFReference(source, torch.float32, round_to=torch.float16)
    name = "layers.1.mlp.up_proj.weight"
    want = source.read_tensors([name])[name].to(torch.float16).to(torch.float32)
    assert torch.equal(dict(ref.model.named_parameters())[name], want)


def test_a_whole_packs_inputs_file_made_a_tensor_at_a_time_is_the_one_made_at_once(tmp_path):
    source = resolve("tiny-llama")
    cfg = source.config
    ref = HFReference(source, torch.float32)
    hidden = torch.randn(1, 15, cfg.hidden_size)
    prefill = pts.Prefill(lambda layers: ref, cfg, [range(cfg.num_layers)], hidden[:, :12], torch.float32,
                          directory=tmp_path / "cache")
    point = pts.Point("prefill", 0, "opt", 3, 12)
    data = pts.point_data(cfg, torch.float32, point, prefill, hidden)
    spec = StackSpec(0, cfg.num_layers, True)
    for name, feed in (("eager", pts.feed_for(data, spec, data.hidden_in)),
                       ("lazy", pts.lazy_feed(data, spec, data.hidden_in))):
        writer = polyjson.inputs_writer(tmp_path / f"{name}.json")
        writer.append(feed)
        writer.close()
    assert (tmp_path / "lazy.json").read_bytes() == (tmp_path / "eager.json").read_bytes()


class _FixedRunner:
    """A runner whose outputs per point are given: hidden_out and a cache tensor."""

    def __init__(self, name, outputs):
        self.name, self.outputs = name, outputs

    def activate(self):
        pass

    def deactivate(self):
        pass

    def infer(self, feed):
        return self.outputs[int(feed["point"][0])]

    def last_inference_time(self):
        return 0.0


def test_a_measure_is_taken_from_the_earlier_runners_hidden_out_alone(tmp_path):
    """The int4 quality figure: taken point by point as the later runner runs, with only the
    earlier runner's measured output kept (its cache tensors are never spilled)."""
    g = np.random.default_rng(2)
    outs = {name: [OrderedDict(hidden_out=g.standard_normal((1, 3, 8)).astype(np.float16),
                               present_key0=g.standard_normal((1, 2, 64, 4)).astype(np.float16)) for _ in range(2)]
            for name in ("fp", "int4")}
    points = [SimpleNamespace(point=SimpleNamespace(label=f"p{k}"), leaving={}) for k in range(2)]
    job = Job(pack=0, base="decoder", group=points,
              feed_of=lambda data, runner: OrderedDict(point=np.array([points.index(data)])))
    rel = lambda a, b: float(np.linalg.norm(b.astype(np.float64) - a) / np.linalg.norm(a.astype(np.float64)))  # noqa: E731
    streamer = Streamer(tmp_path, [], None, Meter(), {}, lambda line: None,
                        measures=[Measure("fp", "int4", "hidden_out", rel)])
    for name in ("fp", "int4"):
        streamer.run(_FixedRunner(name, outs[name]), [job], set())
    spilled = sorted(p.relative_to(streamer.spill_root).as_posix() for p in streamer.spill_root.rglob("*.npy"))
    streamer.close()
    assert spilled == ["decoder/fp/0.0/0.npy", "decoder/fp/0.1/0.npy"]
    files = {name: RunResults.load(str(tmp_path / f"decoder.outputs.{name}.json"))[name] for name in ("fp", "int4")}
    for k in range(2):
        want = rel(files["fp"][k]["hidden_out"], files["int4"][k]["hidden_out"])
        assert streamer.measured[("decoder", "int4", f"p{k}")] == want
