"""Export: the I/O contract, and ONNX Runtime on exported graphs against transformers' own model."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from kvplan.export.exporter import causal_mask, io_contract
from kvplan.models import resolve
from kvplan.validate.onnx_stack import OnnxStack
from kvplan.validate.reference import HFReference

DTYPE = {"float32": torch.float32, "float16": torch.float16}
# fp16: ORT and torch both round every op to fp16 but accumulate differently; over
# 4 layers of O(1) activations the observed worst case is a few fp16 ulps at
# magnitude ~4 (ulp 2^-8 = 0.004). 2e-2 absolute plus 1e-2 relative leaves room
# for that and still catches a wrong op (errors of order 0.1-1).
TOL = {"float32": (1e-4, 0.0), "float16": (2e-2, 1e-2)}
POINTS = [(8, 0), (10, 303), (1, 302), (1, 1000)]


def _onnx_type(dtype: str) -> int:
    return {"float32": onnx.TensorProto.FLOAT, "float16": onnx.TensorProto.FLOAT16,
            "bfloat16": onnx.TensorProto.BFLOAT16, "int64": onnx.TensorProto.INT64}[dtype]


def _dims(value_info) -> list:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


@pytest.fixture(scope="module")
def references():
    cache = {}

    def get(preset: str, dtype: str) -> HFReference:
        if (preset, dtype) not in cache:
            cache[preset, dtype] = HFReference(resolve(preset), DTYPE[dtype])
        return cache[preset, dtype]

    return get


def compare_point(ref: HFReference, packs, dtype: str, n: int, last: int, mask_fn=None, seed: int = 1):
    """Max abs error (and allowed bound) of ORT vs transformers at (N, lastSum), after a real prefill."""
    cfg = ref.source.config
    tdtype = DTYPE[dtype]
    cache = ref.prefill(torch.randn(1, last, cfg.hidden_size, generator=torch.Generator().manual_seed(seed)))
    past = [t.clone() for t in ref.cache_tensors(cache, cfg.num_layers)] if last else [
        torch.zeros(1, cfg.num_kv_heads, 0, cfg.head_dim, dtype=tdtype) for _ in range(2 * cfg.num_layers)]
    g = torch.Generator().manual_seed(seed + 1)
    hidden = torch.randn(1, n, cfg.hidden_size, generator=g).to(tdtype)
    mask = causal_mask(1, n, last, tdtype)
    if mask_fn is not None:
        mask = mask_fn(mask)
    pos = torch.arange(last, last + n)[None]
    expected = ref.step(hidden, mask, pos, cache)
    got_hidden, got_past = OnnxStack(packs).step(hidden.numpy(), mask.numpy(), pos.numpy(), [p.numpy() for p in past])
    atol, rtol = TOL[dtype]
    worst = []
    for name, got, want in [("hidden_out", got_hidden, expected.hidden)] + [
            (f"kv{i}", g_, w_) for i, (g_, w_) in enumerate(zip(got_past, expected.past))]:
        want = want.float().numpy()
        got = got.astype(np.float32)
        assert got.shape == want.shape, name
        excess = np.abs(got - want) - (atol + rtol * np.abs(want))
        worst.append((float(excess.max()), name, float(np.abs(got - want).max())))
    return max(worst)


class TestContract:
    @pytest.mark.parametrize("kv_format", [0, 1])
    def test_names_shapes_and_dtypes_follow_the_contract(self, export_tiny, kv_format):
        packs = export_tiny("tiny-llama", "float16", kv_format)
        model = onnx.load(packs[0].path)
        cfg = resolve("tiny-llama").config
        contract = io_contract(cfg, packs[0].spec, 1, "float16")
        assert [v.name for v in model.graph.input] == list(contract["inputs"])
        assert [v.name for v in model.graph.output] == list(contract["outputs"])
        for v in list(model.graph.input) + list(model.graph.output):
            want = {**contract["inputs"], **contract["outputs"]}[v.name]
            assert _dims(v) == want["shape"], v.name
            assert v.type.tensor_type.elem_type == _onnx_type(want["dtype"]), v.name

    def test_packs_are_chained_and_only_the_last_has_the_final_norm(self, export_tiny):
        packs = export_tiny("tiny-llama", "float32", 0, 2)
        assert [list(p.spec.layers) for p in packs] == [[0, 1], [2, 3]]
        first, last = (onnx.load(p.path) for p in packs)
        assert [v.name for v in last.graph.input][3:5] == ["past_key_in2", "past_value_in2"]
        assert not any("norm.weight" == i.name.split("layers.")[-1] for i in first.graph.initializer)
        assert any(i.name == "norm.weight" for i in last.graph.initializer)

    def test_bfloat16_exports_with_bfloat16_io(self, export_tiny):
        model = onnx.load(export_tiny("tiny-llama", "bfloat16")[0].path)
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.BFLOAT16
        onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("kv_format", [0, 1])
@pytest.mark.parametrize("pack", [0, 2])
def test_onnx_runtime_matches_transformers(export_tiny, references, dtype, kv_format, pack):
    ref = references("tiny-llama", dtype)
    packs = export_tiny("tiny-llama", dtype, kv_format, pack)
    for n, last in POINTS:
        excess, name, err = compare_point(ref, packs, dtype, n, last)
        assert excess <= 0, f"(N={n}, lastSum={last}): {name} max abs error {err:.3g} exceeds tolerance"


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-qwen3"])
def test_family_variants_match_transformers(export_tiny, references, preset):
    ref = references(preset, "float32")
    packs = export_tiny(preset, "float32")
    for n, last in POINTS:
        excess, name, err = compare_point(ref, packs, "float32", n, last)
        assert excess <= 0, f"{preset} (N={n}, lastSum={last}): {name} max abs error {err:.3g}"


def test_non_causal_mask_with_reserved_slots_matches_transformers(export_tiny, references):
    """MiniCPM-o's streaming TTS masks text slots reserved but not yet filled."""
    def reserve_slots(mask):
        mask = mask.clone()
        mask[..., 3:8] = torch.finfo(mask.dtype).min      # five past slots not yet filled
        return mask
    ref = references("tiny-llama", "float32")
    excess, name, err = compare_point(ref, export_tiny("tiny-llama", "float32"), "float32", 4, 20, reserve_slots)
    assert excess <= 0, f"{name}: {err:.3g}"
    # And the mask really matters: the causal result differs.
    plain, _, _ = compare_point(ref, export_tiny("tiny-llama", "float32"), "float32", 4, 20)
    assert plain <= 0


def test_reserved_slots_change_the_result(export_tiny):
    cfg = resolve("tiny-llama").config
    stack = OnnxStack(export_tiny("tiny-llama", "float32"))
    rng = np.random.default_rng(0)
    past = [rng.standard_normal((1, cfg.num_kv_heads, 20, cfg.head_dim)).astype(np.float32) for _ in range(8)]
    hidden = rng.standard_normal((1, 4, cfg.hidden_size)).astype(np.float32)
    mask = causal_mask(1, 4, 20, torch.float32).numpy()
    pos = np.arange(20, 24)[None]
    causal, _ = stack.step(hidden, mask, pos, past)
    mask[..., 3:8] = np.finfo(np.float32).min
    reserved, _ = stack.step(hidden, mask, pos, past)
    assert np.abs(causal - reserved).max() > 1e-3


@pytest.mark.parametrize("kv_io", ["concat", "delta", "inplace"])
def test_greedy_generation_through_onnx_reproduces_generate(request, kv_io):
    """Embeddings and LM head in PyTorch, the decoder through ONNX Runtime with the flattened cache."""
    packs = request.getfixturevalue("export_tiny")("tiny-llama", "float32") if kv_io == "concat" else \
        request.getfixturevalue(f"export_tiny_{kv_io}")
    source = resolve("tiny-llama")
    cfg = source.config
    ref = HFReference(source, torch.float32, with_lm=True)
    prompt = torch.tensor([[1, 17, 42, 99, 5, 7]])
    want = ref.model.generate(prompt, max_new_tokens=32, do_sample=False, min_new_tokens=32)[0, prompt.shape[1]:]

    stack = OnnxStack(packs)
    embed, head = ref.model.get_input_embeddings(), ref.model.lm_head
    past = [np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32) for _ in range(2 * cfg.num_layers)]
    tokens, last, new = prompt, 0, []
    with torch.no_grad():
        for _ in range(32):
            n = tokens.shape[1]
            mask = causal_mask(1, n, last, torch.float32).numpy()
            hidden, past = stack.step(embed(tokens).numpy(), mask, np.arange(last, last + n)[None], past)
            token = int(head(torch.from_numpy(hidden[:, -1])).argmax(-1))
            new.append(token)
            last += n
            tokens = torch.tensor([[token]])
    assert new == want.tolist()


class TestDeltaKvIo:
    """kv_io = "delta": the graph outputs only the N new rows; the runtime appends them."""

    def test_outputs_are_present_rows_of_length_n(self, export_tiny_delta):
        model = onnx.load(export_tiny_delta[0].path)
        outputs = {v.name: _dims(v) for v in model.graph.output}
        assert list(outputs)[:3] == ["hidden_out", "present_key0", "present_value0"]
        assert outputs["present_key0"] == [1, 2, "N", 16]
        assert [v.name for v in model.graph.input][3:5] == ["past_key_in0", "past_value_in0"]

    @pytest.mark.parametrize("n,last", [(8, 0), (1, 302), (10, 303)])
    def test_matches_transformers_after_appending(self, export_tiny_delta, references, n, last):
        excess, name, err = compare_point(references("tiny-llama", "float32"), export_tiny_delta, "float32", n, last)
        assert excess <= 0, f"(N={n}, lastSum={last}): {name} max abs error {err:.3g}"

    def test_decode_writes_only_new_rows(self, export_tiny, export_tiny_delta):
        """Bytes of KV written per decode step, from the graphs' output shapes at lastSum = 302."""
        def kv_bytes(packs, last):
            model = onnx.load(packs[0].path)
            sizes = {"N": 1, "sumN": last + 1}
            total = 0
            for v in model.graph.output[1:]:
                n = 1
                for d in _dims(v):
                    n *= sizes.get(d, d)
                total += n * 4
            return total
        assert kv_bytes(export_tiny("tiny-llama"), 302) == 303 * kv_bytes(export_tiny_delta, 302)


@pytest.fixture(scope="module")
def export_tiny_delta(tmp_path_factory):
    from kvplan.decoder import pack_specs
    from kvplan.export.exporter import export_pack
    from kvplan.validate.onnx_stack import Pack
    source = resolve("tiny-llama")
    [spec] = pack_specs(source.config, 0, 0, "delta")
    path = tmp_path_factory.mktemp("delta") / "decoder.onnx"
    export_pack(source, spec, "float32", 1, path)
    return [Pack(spec, path)]


def test_large_graphs_are_written_with_external_data(tmp_path, monkeypatch):
    """Above protobuf's 2 GB limit weights go to decoder.onnx.data; here the threshold is lowered."""
    import kvplan.export.exporter as export_mod
    from kvplan import surgery
    from kvplan.decoder import pack_specs
    from kvplan.validate.onnx_stack import Pack
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_THRESHOLD", 0)
    source = resolve("tiny-llama")
    [spec] = pack_specs(source.config, 0)
    result = export_mod.export_pack(source, spec, "float32", 1, tmp_path / "decoder.onnx")
    # Tiny tensors (the norm gains) may stay inline; the matrices go to the data file.
    assert result.external_data and (tmp_path / "decoder.onnx.data").stat().st_size > 0.99 * result.weight_bytes
    assert (tmp_path / "decoder.onnx").stat().st_size < result.weight_bytes / 2
    ref = HFReference(source)
    excess, name, err = compare_point(ref, [Pack(spec, tmp_path / "decoder.onnx")], "float32", 4, 12)
    assert excess <= 0, f"{name}: {err:.3g}"
    report = surgery.fuse_file(tmp_path / "decoder.onnx", tmp_path / "decoder.fused.onnx", ["rmsnorm", "rope"], log=None)
    assert report["passes"]["rmsnorm"]["fused"] == 9


def test_written_graph_computes_what_the_stack_module_does(export_tiny):
    """The graph is written op by op (kvplan/export/emit.py); DecoderStack, the torch side of
    validation, spells the same arithmetic independently."""
    from kvplan.decoder import DecoderStack
    from kvplan.export.exporter import example_inputs
    source = resolve("tiny-qwen3")
    [pack] = export_tiny("tiny-qwen3", "float32", 1)
    with torch.device("meta"):
        stack = DecoderStack(source.config, pack.spec)
    stack.load_state_dict(source.read_tensors(list(stack.state_dict())), assign=True, strict=True)
    stack.rotary = type(stack.rotary)(source.config, torch.float32)     # its buffer was built on meta
    args = example_inputs(source.config, pack.spec, 1, torch.float32, n=5, last=7)
    with torch.no_grad():
        want = stack.eval()(*args)
    import onnxruntime as ort
    sess = ort.InferenceSession(str(pack.path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {i.name: a.numpy() for i, a in zip(sess.get_inputs(), args)})
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert np.abs(g - w.numpy()).max() < 1e-5


CACHE_LEN = 320     # rows of the in-place buffer in these tests: holds lastSum 303 + N 10


@pytest.fixture(scope="module")
def export_tiny_inplace(tmp_path_factory):
    from kvplan.decoder import pack_specs
    from kvplan.export.exporter import export_pack
    from kvplan.validate.onnx_stack import Pack
    source = resolve("tiny-llama")
    [spec] = pack_specs(source.config, 0, 0, "inplace", CACHE_LEN)
    path = tmp_path_factory.mktemp("inplace") / "decoder.onnx"
    export_pack(source, spec, "float32", 1, path)
    return [Pack(spec, path)]


def _inplace_session(packs):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.log_severity_level = 3          # ONNX Runtime warns that its TensorScatter copies the buffer
    return ort.InferenceSession(str(packs[0].path), opts, providers=["CPUExecutionProvider"])


class TestInplaceKvIo:
    """kv_io = "inplace": the cache inputs are a preallocated buffer; each step writes its N rows
    into it (TensorScatter, TensorRT's in-place KV-cache update) and attends over the whole buffer."""

    def test_contract_is_a_static_buffer_with_write_indices(self, export_tiny_inplace):
        model = onnx.load(export_tiny_inplace[0].path)
        inputs = {v.name: _dims(v) for v in model.graph.input}
        outputs = {v.name: _dims(v) for v in model.graph.output}
        assert list(inputs)[:5] == ["hidden_in", "attention_mask", "position_ids", "write_indices", "past_key_in0"]
        assert inputs["write_indices"] == [1]
        assert model.graph.input[3].type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert inputs["attention_mask"] == [1, 1, "N", CACHE_LEN]
        assert inputs["past_key_in0"] == outputs["past_key0"] == [1, 2, CACHE_LEN, 16]
        assert {o.domain: o.version for o in model.opset_import}[""] == 24

    def test_each_layer_writes_key_and_value_with_one_tensor_scatter(self, export_tiny_inplace):
        model = onnx.load(export_tiny_inplace[0].path)
        scatters = [n for n in model.graph.node if n.op_type == "TensorScatter"]
        assert len(scatters) == 2 * 4
        assert all(n.domain == "" for n in scatters)
        assert {onnx.helper.get_attribute_value(a) for n in scatters for a in n.attribute} >= {2, b"linear"}
        assert not [n for n in model.graph.node if n.op_type == "Concat" and "past_key_in0" in n.input]

    @pytest.mark.parametrize("n,last", [(8, 0), (1, 302), (10, 303)])
    def test_matches_transformers(self, export_tiny_inplace, references, n, last):
        excess, name, err = compare_point(references("tiny-llama", "float32"), export_tiny_inplace, "float32", n, last)
        assert excess <= 0, f"(N={n}, lastSum={last}): {name} max abs error {err:.3g}"

    def test_rows_beyond_the_step_are_left_as_they_were_and_never_read(self, export_tiny_inplace):
        from kvplan.export.exporter import example_inputs, input_names
        spec = export_tiny_inplace[0].spec
        args = example_inputs(resolve("tiny-llama").config, spec, 1, torch.float32, n=3, last=40)
        feed = {k: v.numpy() for k, v in zip(input_names(spec), args)}
        sess = _inplace_session(export_tiny_inplace)
        first = sess.run(None, feed)
        for k, out in zip(input_names(spec)[4:], first[1:]):
            assert np.array_equal(out[:, :, :40], feed[k][:, :, :40]), k         # the past, untouched
            assert np.array_equal(out[:, :, 43:], feed[k][:, :, 43:]), k         # stale rows, untouched
        stale = {k: v.copy() for k, v in feed.items()}
        for k in input_names(spec)[4:]:
            stale[k][:, :, 43:] = 1e4
        second = sess.run(None, stale)
        assert np.array_equal(first[0], second[0])
        assert np.array_equal(first[1][:, :, :43], second[1][:, :, :43])

    def test_a_runtime_feeding_the_buffer_back_matches_the_concat_graph(self, export_tiny, export_tiny_inplace):
        """Prefill then 8 decode steps with one buffer per tensor fed back as the next input,
        write_indices advancing, against the concat graph carrying a growing cache."""
        cfg = resolve("tiny-llama").config
        concat = OnnxStack(export_tiny("tiny-llama"))
        sess = _inplace_session(export_tiny_inplace)
        names = [i.name for i in sess.get_inputs()][4:]
        g = torch.Generator().manual_seed(3)
        buffers = {k: np.zeros((1, cfg.num_kv_heads, CACHE_LEN, cfg.head_dim), np.float32) for k in names}
        past = [np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32) for _ in range(2 * cfg.num_layers)]
        last = 0
        for n in [6] + [1] * 8:
            hidden = torch.randn(1, n, cfg.hidden_size, generator=g).numpy()
            pos = np.arange(last, last + n)[None]
            want, past = concat.step(hidden, causal_mask(1, n, last, torch.float32).numpy(), pos, past)
            feed = {"hidden_in": hidden, "position_ids": pos, "write_indices": np.array([last]),
                    "attention_mask": causal_mask(1, n, last, torch.float32, length=CACHE_LEN).numpy(), **buffers}
            got, *kv = sess.run(None, feed)
            buffers = dict(zip(names, kv))
            last += n
            assert np.abs(got - want).max() < 1e-5
            assert np.abs(buffers["past_key_in3"][:, :, :last] - past[6]).max() < 1e-5


def test_inplace_needs_the_standard_layout_and_a_buffer_the_model_can_fill():
    from kvplan.decoder import pack_specs
    cfg = resolve("tiny-llama").config
    with pytest.raises(ValueError, match="kv_format 0"):
        pack_specs(cfg, 0, 1, "inplace", 64)
    with pytest.raises(ValueError, match=r"cache_len <= max positions \(4096\), got 5000"):
        pack_specs(cfg, 0, 0, "inplace", 5000)


def test_kv_write_refuses_rows_beyond_the_buffer():
    from kvplan.kv_write import kv_write
    cache, update = torch.zeros(1, 2, 8, 4), torch.ones(1, 2, 3, 4)
    assert kv_write(cache, update, torch.tensor([5]), 2)[0, 0, :, 0].tolist() == [0, 0, 0, 0, 0, 1, 1, 1]
    with pytest.raises(IndexError, match="rows 6..8 do not fit a cache of 8 rows"):
        kv_write(cache, update, torch.tensor([6]), 2)


def test_the_exporter_reads_one_layer_ahead_of_the_one_it_writes():
    """Layer i + 1 is read while layer i is written, and no further: at most two layers' weights
    are in memory, however deep the pack."""
    import threading

    from kvplan.export.exporter import _LayerReader
    read, gate = [], threading.Event()

    def fake_read(names):
        read.append(names[0])
        if names[0] == "c":
            gate.wait(5)
        return {n: n.upper() for n in names}
    reader = _LayerReader([["a"], ["b"], ["c"], ["d"]], lambda name, t: t, fake_read)
    assert reader.tensor(0, "a") == "A"
    assert reader.tensor(1, "b") == "B"
    assert read[:2] == ["a", "b"] and "d" not in read        # c is being read, d not yet
    assert set(reader.futures) == {1, 2}                       # a's weights are gone
    gate.set()
    assert reader.tensor(2, "c") == "C" and reader.tensor(3, "d") == "D"
    assert read == ["a", "b", "c", "d"]
