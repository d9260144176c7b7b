"""The real trained SmolLM2-135M-Instruct (a float16 checkpoint converted by transformers' own GGUF
loader, with its tokenizer) validated with the shipped tolerances on the inputs it would see
(its embeddings of the shipped text): a correct target passes, in fp16 and in int4 faithfulness,
and a wrong graph still fails, naming what is wrong.

How a wrong graph is made: as in test_validate, a copy of the built target whose fused graph is
edited and recorded in the manifest as if the surgery stage had written it (a pass with a bug);
the copy has no engine (its stage record and plan are dropped), so validation checks what it has.
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
import torch
import transformers
from test_validate import copy_with_fused_graph_edited, swap_key_caches

from kvplan.cli import build_main, main, validate_main
from kvplan.manifest import load_manifest

# Each validation of the real model runs for minutes on two cores.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fp16(smollm2_checkpoint, tmp_path_factory):
    """The shipped fp16 profile, every stage, then ``--validate``: the acceptance command."""
    out = tmp_path_factory.mktemp("real-fp16") / "engines"
    rc = build_main(["--model", str(smollm2_checkpoint), "--profile", "fp16", "--out", str(out), "--validate"])
    return {"model": smollm2_checkpoint, "out": out, "rc": rc, "target": out / smollm2_checkpoint.name / "fp16"}


def test_the_shipped_fp16_profile_passes_on_the_real_model(fp16):
    record = load_manifest(fp16["target"])["validation"]
    assert fp16["rc"] == 0 and record["status"] == "pass", record["pairs"]
    assert all(p["passed"] for p in record["pairs"].values())
    assert record["inputs"]["kind"] == "text" and record["inputs"]["text"] == "validation_text.txt"
    assert all(r["agreement"] >= 0.95 for r in record["task"]["stacks"].values() if r["ran"])


def test_the_whole_step_gives_transformers_causal_lm_logits_on_the_real_model(fp16):
    """embed.onnx -> decoder -> head.onnx against LlamaForCausalLM, and the plans of all three built."""
    manifest = load_manifest(fp16["target"])
    whole = manifest["validation"]["whole_step"]
    assert whole["ran"] and all(p["within"] and p["top1"] >= 0.95 for p in whole["points"].values()), whole
    plans = {a["path"] for a in manifest["stages"]["engines"]["artifacts"]}
    assert {"decoder.plan", "embed.plan", "head.plan"} <= plans


def test_greedy_generation_on_the_real_model_is_transformers_own(fp16, capsys):
    prompt = "Paris is the capital of"
    capsys.readouterr()
    assert main(["generate", "--model", str(fp16["model"]), "--profile", "fp16", "--out", str(fp16["out"]),
                 "--prompt", prompt, "--max-new-tokens", "8"]) == 0
    got = capsys.readouterr().out.strip()
    tok = transformers.AutoTokenizer.from_pretrained(str(fp16["model"]))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(fp16["model"]), dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        want = model.generate(ids, do_sample=False, max_new_tokens=8)[0, ids.shape[1]:]
    assert got == tok.decode(want, skip_special_tokens=True).strip()


def _wrong_copy(fp16, tmp_path, edit) -> list[str]:
    copy = copy_with_fused_graph_edited(fp16["out"], fp16["out"] / fp16["model"].name / "fp16", tmp_path, edit,
                                        drop_engines=True)
    return ["--model", str(fp16["model"]), "--profile", "fp16", "--out", str(copy), "--no-task"]


def _failing(fp16, tmp_path) -> list[str]:
    record = load_manifest(tmp_path / "engines" / fp16["model"].name / "fp16")["validation"]
    assert record["pairs"]["pytorch vs onnxrt-export"]["passed"]
    return record["pairs"]["pytorch vs onnxrt-fused"]["failing_tensors"]


def test_a_perturbed_weight_fails_on_the_real_model(fp16, tmp_path, capsys):
    def perturb(model):
        [init] = [t for t in model.graph.initializer if t.name == "layers.2.post_attention_layernorm.weight"]
        values = onnx.numpy_helper.to_array(init)
        init.CopyFrom(onnx.numpy_helper.from_array((values + np.float16(0.05)).astype(values.dtype), init.name))

    rc = validate_main(_wrong_copy(fp16, tmp_path, perturb))
    assert rc == 1, capsys.readouterr().out
    failing = _failing(fp16, tmp_path)
    # Layer 2's MLP input changes what leaves layer 2: the stack's output and later layers' caches,
    # never the caches of layers 0..2.
    assert any(t.endswith(" hidden_out") for t in failing) and any(t.endswith(" past_key3") for t in failing)
    assert not any(t.endswith(f" past_{kind}{i}") for kind in ("key", "value") for i in range(3) for t in failing)


def test_a_swapped_cache_fails_on_the_real_model(fp16, tmp_path, capsys):
    rc = validate_main(_wrong_copy(fp16, tmp_path, swap_key_caches))
    assert rc == 1, capsys.readouterr().out
    failing = _failing(fp16, tmp_path)
    assert any(t.endswith(" past_key0") for t in failing) and any(t.endswith(" past_key1") for t in failing)
    assert not any("hidden_out" in t or "past_value" in t for t in failing)


def test_int4_awq_faithfulness_passes_on_the_real_model(smollm2_checkpoint, tmp_path):
    """The shipped int4-awq profile, fitted to SmolLM2's 576 (group 64), calibrated on the model's own text."""
    out = tmp_path / "engines"
    args = ["--model", str(smollm2_checkpoint), "--profile", "int4-awq", "--out", str(out)]
    assert build_main([*args, "--stop-after", "surgery"]) == 0
    # The points are the verdict here; the task checks (six minutes of int4 steps) are the fp16 test's.
    rc = validate_main([*args, "--no-task"])
    record = load_manifest(out / smollm2_checkpoint.name / "int4-awq")["validation"]
    assert load_manifest(out / smollm2_checkpoint.name / "int4-awq")["profile"]["quantize"]["group_size"] == 64
    assert rc == 0 and record["status"] == "pass", record["pairs"]
    assert record["inputs"]["kind"] == "text"
