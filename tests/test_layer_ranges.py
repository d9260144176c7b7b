"""--layer-ranges: every runner runs a single-pack graph a few layers at a time, each range fed
the runner's own hidden_out of the range before, so the ranges compute what the whole graph
does while only one range's weights are in memory.

tiny-llama (4 layers), float32, exported and fused, no engine. A range graph is the original's
nodes and weights between two layer boundaries; the Polygraphy files are the whole graph's; a
weight perturbed in one range fails from that range on, named by its layers, and not before.
"""
from __future__ import annotations

import json
import re
import shutil

import numpy as np
import onnx
import onnx.numpy_helper
import onnxruntime as ort
import pytest
import torch
from polygraphy.comparator import RunResults
from polygraphy.json import load_json
from test_validate import swap_key_caches

from kvplan.cli import build_main, validate_main
from kvplan.decoder import StackSpec
from kvplan.errors import GraphError
from kvplan.export.exporter import input_names, output_names
from kvplan.manifest import load_manifest, sha256_file
from kvplan.models import resolve
from kvplan.validate.ranges import range_specs, write_ranges
from kvplan.validate.segments import RANGE_BYTES, layer_bytes, range_count

PROFILE = """description = "layer-range test profile"
[export]
dtype = "float32"
[surgery]
passes = ["rmsnorm", "rope", "attention"]
[engine]
[[engine.shapes]]
name = "prefill"
N = [1, 4, 8]
lastSum = [0, 8, 16]
[validate]
atol = 1e-4
rtol = 1e-4
"""


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    root = tmp_path_factory.mktemp("ranges")
    profile = root / "vranges.toml"
    profile.write_text(PROFILE)
    out = root / "engines"
    assert build_main(["--model", "tiny-llama", "--profile", str(profile), "--out", str(out),
                       "--stop-after", "surgery"]) == 0
    return {"profile": profile, "out": out}


def _args(target, out, *extra):
    return ["--model", "tiny-llama", "--profile", str(target["profile"]), "--out", str(out),
            "--points", "opt", "--no-task", *extra]


def test_ranges_split_the_layers_evenly_and_only_the_last_keeps_the_norm():
    specs = range_specs(StackSpec(0, 20, True), 3)
    assert [(s.first_layer, s.last_layer, s.final_norm) for s in specs] == [(0, 7, False), (7, 14, False),
                                                                            (14, 20, True)]
    with pytest.raises(ValueError, match="between 1 and the number of layers"):
        range_specs(StackSpec(0, 4, True), 5)


def test_a_range_graph_has_the_pack_contract_and_only_its_layers_weights(target, tmp_path):
    graph = target["out"] / "tiny-llama" / "vranges" / "decoder.fused.onnx"
    specs = range_specs(StackSpec(0, 4, True), 2)
    paths = write_ranges(graph, specs, 4, tmp_path, "decoder.fused")
    assert [p.name for p in paths] == ["decoder.fused.layers0-1.onnx", "decoder.fused.layers2-3.onnx"]
    for spec, path in zip(specs, paths):
        model = onnx.load(str(path))
        onnx.checker.check_model(model)
        assert [v.name for v in model.graph.input] == input_names(spec)
        assert [v.name for v in model.graph.output] == output_names(spec)
        # Weights are named layers.<i>.<module>; shared constants (layers.0/...) may serve any layer.
        layers = {int(m.group(1)) for t in model.graph.initializer if (m := re.match(r"layers\.(\d+)\.", t.name))}
        assert layers == set(spec.layers)
        assert any(t.name == "norm.weight" for t in model.graph.initializer) == spec.final_norm


def test_a_graph_that_cannot_be_cut_is_refused_naming_the_layer(target, tmp_path):
    model = onnx.load(str(target["out"] / "tiny-llama" / "vranges" / "decoder.onnx"))
    for node in model.graph.node:          # layer 2 no longer names its nodes after its layer
        node.name = node.name.replace("layers.2/", "block/")
    bad = tmp_path / "decoder.onnx"
    onnx.save(model, str(bad))
    with pytest.raises(GraphError, match="cannot cut after layer 1"):
        write_ranges(bad, range_specs(StackSpec(0, 4, True), 2), 4, tmp_path / "out", "decoder")


@pytest.fixture(scope="module")
def validated(target, tmp_path_factory):
    """A copy of the target validated in two layer ranges: (its directory, exit code, printed text)."""
    out = tmp_path_factory.mktemp("ranges-validated") / "engines"
    shutil.copytree(target["out"], out)
    with pytest.MonkeyPatch.context() as m:
        lines = []
        m.setattr("builtins.print", lambda *a, **k: lines.append(" ".join(map(str, a))))
        rc = validate_main(_args(target, out, "--layer-ranges", "2"))
    return out / "tiny-llama" / "vranges", rc, "\n".join(lines)


def test_a_stack_validated_in_layer_ranges_passes_every_range(validated):
    directory, rc, text = validated
    assert rc == 0, text
    record = load_manifest(directory)["validation"]
    assert record["layer_ranges"] == ["0..1", "2..3"]
    assert record["pairs"]["pytorch vs onnxrt-fused"]["passed"]
    # The whole graph's Polygraphy files, and the target's own graphs (not the ranges) as artifacts.
    assert {"validation/decoder.prefill.inputs.json", "validation/decoder.prefill.outputs.onnxrt-fused.json",
            "validation/decoder.prefill.outputs.pytorch.json"} <= set(record["files"])
    assert sorted(record["artifacts"]) == ["decoder.fused.onnx", "decoder.onnx"]
    # The ranges' graphs went with the validation's private directory.
    assert not [p for p in (directory / "validation").iterdir() if p.name.startswith(".")]


def test_ranges_chained_on_their_own_outputs_give_what_the_whole_graph_computes(validated):
    """The outputs validation wrote for the fused graph run in two ranges are the whole graph's outputs
    on the whole graph's inputs (its own run of decoder.fused.onnx on the saved feed)."""
    directory, rc, text = validated
    assert rc == 0, text
    feeds = load_json(str(directory / "validation" / "decoder.prefill.inputs.json"))
    saved = RunResults.load(str(directory / "validation" / "decoder.prefill.outputs.onnxrt-fused.json"))
    [(_, iterations)] = list(saved.items())
    session = ort.InferenceSession(str(directory / "decoder.fused.onnx"), providers=["CPUExecutionProvider"])
    for feed, iteration in zip(feeds, iterations):
        whole = dict(zip(output_names(StackSpec(0, 4, True)), session.run(None, dict(feed))))
        assert list(iteration.keys()) == list(whole)
        for name, value in whole.items():
            np.testing.assert_allclose(iteration[name], value, atol=1e-5, rtol=1e-5, err_msg=name)


def test_auto_ranges_leave_a_small_model_whole():
    cfg = resolve("tiny-llama").config
    assert range_count("auto", cfg, [StackSpec(0, cfg.num_layers, True)], torch.float32) == 1


def test_auto_ranges_hold_about_64_mib_of_weights_each():
    cfg = resolve("minicpmo26-tts").config
    count = range_count("auto", cfg, [StackSpec(0, cfg.num_layers, True)], torch.float16)
    per_range = -(-cfg.num_layers // count) * layer_bytes(cfg, torch.float16)
    assert count == 7 and per_range <= RANGE_BYTES
    assert range_count("auto", cfg, [StackSpec(0, 10, False), StackSpec(10, 20, True)], torch.float16) == 1
    assert range_count(0, cfg, [StackSpec(0, cfg.num_layers, True)], torch.float16) == 1


def _edited_copy(target, tmp_path, edit):
    """A copy of the target whose fused graph ``edit`` changed, recorded in the manifest as if the
    surgery stage had written it: (the copy's out directory, its target directory)."""
    out = tmp_path / "engines"
    shutil.copytree(target["out"], out)
    directory = out / "tiny-llama" / "vranges"
    path = directory / "decoder.fused.onnx"
    model = onnx.load(str(path))
    edit(model)
    onnx.save(model, str(path))
    manifest = json.loads((directory / "manifest.json").read_text())
    for entry in manifest["stages"]["surgery"]["artifacts"]:
        if entry["path"] == path.name:
            entry["bytes"], entry["sha256"] = path.stat().st_size, sha256_file(path)
    (directory / "manifest.json").write_text(json.dumps(manifest))
    return out, directory


# Slow (14 s): the whole-stack twin in test_validate stays in the default run.
@pytest.mark.slow
def test_a_perturbed_weight_fails_the_range_holding_it_and_names_it(target, tmp_path, capsys):
    def perturb(model):
        [init] = [t for t in model.graph.initializer if t.name == "layers.2.post_attention_layernorm.weight"]
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + np.float32(0.05), init.name))

    out, directory = _edited_copy(target, tmp_path, perturb)
    rc = validate_main(_args(target, out, "--layer-ranges", "2"))
    text = capsys.readouterr().out
    assert rc == 1, text
    failing = load_manifest(directory)["validation"]["pairs"]["pytorch vs onnxrt-fused"]["failing_tensors"]
    # Layer 2's MLP input changes what leaves the second range (layers 2..3): its hidden_out and layer 3's
    # cache; the first range, before the weight, passes.
    assert failing and all("pack1" in t for t in failing), failing
    assert any("hidden_out" in t for t in failing) and any("past_key3" in t for t in failing)
    verdict = next(line for line in text.splitlines() if line.startswith("validation FAIL"))
    assert "layers 2..3" in verdict and "layers 0..1" not in verdict


@pytest.mark.slow  # the whole-graph variant runs by default (test_validate); ranges fail on a perturbed weight by default
def test_a_swapped_cache_tensor_fails_in_layer_ranges_and_names_both_tensors(target, tmp_path, capsys):
    """The ranges are cut from the wrong graph: its past_key0 output carries layer 1's keys and back."""
    out, directory = _edited_copy(target, tmp_path, swap_key_caches)
    rc = validate_main(_args(target, out, "--layer-ranges", "2"))
    text = capsys.readouterr().out
    assert rc == 1, text
    failing = load_manifest(directory)["validation"]["pairs"]["pytorch vs onnxrt-fused"]["failing_tensors"]
    assert any(t.endswith(" past_key0") for t in failing) and any(t.endswith(" past_key1") for t in failing)
    assert not any("hidden_out" in t or "past_value" in t for t in failing)


def test_a_shape_a_layer_reads_off_the_inputs_and_the_next_reuses_does_not_stop_the_cut(target, tmp_path):
    """The exporter may compute a size from attention_mask in one layer and let the next read it; only
    the tensor computed from hidden_in is the boundary, the size is recomputed inside the range."""
    model = onnx.load(str(target["out"] / "tiny-llama" / "vranges" / "decoder.onnx"))
    model.graph.node.append(onnx.helper.make_node("Shape", ["attention_mask"], ["layers.1/mask_shape"],
                                                  name="layers.1/node_Shape_probe"))
    model.graph.node.append(onnx.helper.make_node("Size", ["layers.1/mask_shape"], ["layers.2/mask_rank"],
                                                  name="layers.2/node_Size_probe"))
    path = tmp_path / "decoder.onnx"
    onnx.save(model, str(path))
    paths = write_ranges(path, range_specs(StackSpec(0, 4, True), 2), 4, tmp_path / "out", "decoder")
    assert [p.name for p in paths] == ["decoder.layers0-1.onnx", "decoder.layers2-3.onnx"]
    onnx.checker.check_model(onnx.load(str(paths[1])))


@pytest.mark.parametrize("stored", ["large entries left in the file", "external data"])
def test_a_range_cut_from_weights_read_one_at_a_time_is_the_range_cut_from_memory(target, tmp_path, monkeypatch,
                                                                                   stored):
    """The same nodes and the same weights, whether the source's weights are inline entries copied one
    by one from the file (every entry counted large here) or in an external data file."""
    graph = target["out"] / "tiny-llama" / "vranges" / "decoder.fused.onnx"
    specs = range_specs(StackSpec(0, 4, True), 2)
    plain = write_ranges(graph, specs, 4, tmp_path / "plain", "decoder.fused")
    if stored == "external data":
        source = tmp_path / "external" / "decoder.fused.onnx"
        source.parent.mkdir()
        onnx.save(onnx.load(str(graph)), str(source), save_as_external_data=True, location="decoder.fused.onnx.data",
                  size_threshold=0)
    else:
        source = graph
        monkeypatch.setattr("kvplan.quantize.lazy_onnx.LAZY_BYTES", 1)
    streamed = write_ranges(source, specs, 4, tmp_path / "streamed", "decoder.fused")
    for a, b in zip(plain, streamed):
        want, got = onnx.load(str(a)), onnx.load(str(b))
        assert not any(t.external_data for t in got.graph.initializer)
        assert [n.SerializeToString() for n in got.graph.node] == [n.SerializeToString() for n in want.graph.node]
        weights = {t.name: onnx.numpy_helper.to_array(t) for t in want.graph.initializer}
        assert {t.name for t in got.graph.initializer} == set(weights)
        for t in got.graph.initializer:
            np.testing.assert_array_equal(onnx.numpy_helper.to_array(t), weights[t.name], err_msg=t.name)
