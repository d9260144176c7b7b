"""What validation feeds the points: the model's own embeddings of real tokens, never random
hidden states at a scale the model never sees.

The independent side of each check is read here without kvplan: the embedding matrix straight
from the checkpoint's safetensors file, the tokens from transformers' own tokenizer of the
checkpoint directory, Gemma 2's scale from its definition (√hidden_size).
"""
from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import pytest
import torch
import transformers
from polygraphy.json import load_json
from safetensors import safe_open
from test_validate import write_hf_checkpoint, write_profile

from bench.checkpoint import write_tokenizer
from kvplan.cli import build_main, validate_main
from kvplan.errors import UserError
from kvplan.manifest import load_manifest
from kvplan.models import resolve
from kvplan.models.tokenizer import load_tokenizer
from kvplan.validate import points as pts
from kvplan.validate import tokens
from kvplan.validate.reference import HFReference

ROOT = Path(__file__).resolve().parent.parent


def _embedding_rows(checkpoint: Path, ids: torch.Tensor) -> torch.Tensor:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return f.get_tensor("model.embed_tokens.weight")[ids]


def test_the_real_models_points_are_its_own_embedding_rows_of_the_shipped_texts_tokens(smollm2_checkpoint):
    source = resolve(str(smollm2_checkpoint))
    inputs = tokens.validation_inputs(source, 2, 96, torch.float16)
    text = (ROOT / "kvplan" / "validate" / "validation_text.txt").read_text()
    want = transformers.AutoTokenizer.from_pretrained(str(smollm2_checkpoint), local_files_only=True)(text)["input_ids"]
    assert inputs.ids[0].tolist() == want[:96]
    # Row 1 starts halfway through the text: the two rows are not alike.
    start = inputs.record["row_starts"][1]
    assert start > 96 and inputs.ids[1].tolist() == want[start:start + 96]
    rows = _embedding_rows(smollm2_checkpoint, inputs.ids)
    assert inputs.hidden.dtype == torch.float16 and torch.equal(inputs.hidden, rows)
    # What the model sees: rows of norm about 3, not the ~24 of standard-normal rows of 576 values.
    assert 1.0 < float(inputs.hidden[0].float().norm(dim=-1).mean()) < 6.0
    assert inputs.record | {"row_starts": None} == {
        "kind": "text", "text": "validation_text.txt", "row_starts": None,
        "sha256": hashlib.sha256(text.encode()).hexdigest(), "tokenizer": str(smollm2_checkpoint),
        "text_tokens": len(want), "repeated": False, "embedding": "model.embed_tokens.weight", "rows": 2,
        "length": 96}


def test_the_shipped_text_is_long_enough_for_the_shipped_profiles_without_repeating(smollm2_checkpoint):
    """The fp16 profile's largest point reads 3584 + 512 positions."""
    source = resolve(str(smollm2_checkpoint))
    assert len(source.tokenizer().encode(tokens.shipped_text().content)) >= 4096


def test_a_text_shorter_than_the_points_is_repeated_without_its_special_tokens_again(tmp_path):
    write_tokenizer(tmp_path, 64)
    text = tokens.Text("t.txt", "w5 w6 w7", "0" * 64)
    ids, record = tokens._text_rows(load_tokenizer(tmp_path), text, 1, 8)
    assert ids.tolist() == [[5, 6, 7, 5, 6, 7, 5, 6]] and record["repeated"] and record["text_tokens"] == 3


def test_a_point_is_fed_its_rows_tokens_right_after_the_past_it_is_given():
    source = resolve("tiny-llama")
    cfg = source.config
    inputs = tokens.validation_inputs(source, 2, 20, torch.float32)
    prefill = pts.Prefill(lambda layers: HFReference(source, torch.float32, layers=layers, norm=False), cfg,
                          [range(cfg.num_layers)], inputs.hidden[:, :12], torch.float32)
    plain = pts.point_data(cfg, torch.float32, pts.Point("prefill", 0, "opt", 3, 12), prefill, inputs.hidden)
    assert torch.equal(plain.hidden_in, inputs.hidden[:1, 12:15])
    batch = pts.point_data(cfg, torch.float32, pts.Point("decode", 1, "batch", 1, 12, batch=2, rows=(12, 6)),
                           prefill, inputs.hidden)
    assert torch.equal(batch.hidden_in[0], inputs.hidden[0, 12:13])
    assert torch.equal(batch.hidden_in[1], inputs.hidden[1, 6:7])
    assert not torch.equal(inputs.ids[0], inputs.ids[1])


def test_a_model_without_a_tokenizer_is_fed_embeddings_of_seeded_token_ids():
    source = resolve("tiny-llama")
    a = tokens.validation_inputs(source, 1, 16, torch.float32)
    b = tokens.validation_inputs(source, 1, 16, torch.float32)
    assert torch.equal(a.ids, b.ids) and int(a.ids.max()) < source.config.vocab_size
    weight = source.read_lm(["embed_tokens.weight"])["embed_tokens.weight"]
    assert torch.equal(a.hidden, weight[a.ids])
    assert a.record == {"kind": "seeded token ids", "seed": 0, "vocab": source.config.vocab_size,
                        "embedding": "embed_tokens.weight", "rows": 1, "length": 16}


def test_a_source_without_an_embedding_matrix_is_fed_seeded_normal_hidden_states_and_says_so():
    source = dataclasses.replace(resolve("tiny-llama"), read_embedding=None, embedding=None, read_lm=None)
    inputs = tokens.validation_inputs(source, 1, 8, torch.float16)
    assert inputs.ids is None and inputs.hidden.shape == (1, 8, source.config.hidden_size)
    assert inputs.record["kind"] == "random hidden states" and "no input embedding matrix" in inputs.describe()


def test_gemma2_is_fed_its_embedding_times_the_square_root_of_hidden_size():
    source = resolve("tiny-gemma2")
    inputs = tokens.validation_inputs(source, 1, 8, torch.float32)
    weight = source.read_lm(["embed_tokens.weight"])["embed_tokens.weight"]
    assert torch.allclose(inputs.hidden, weight[inputs.ids] * source.config.hidden_size ** 0.5)


def test_gemma2s_lm_headed_reference_builds_with_its_embedding_scale():
    """The task check's reference: Gemma 2's scale is a buffer its constructor computes, which the
    meta-device build left without a value."""
    ref = HFReference(resolve("tiny-gemma2"), torch.float32, with_lm=True)
    assert float(ref.model.get_input_embeddings().embed_scale) == resolve("tiny-gemma2").config.hidden_size ** 0.5


def test_a_text_for_a_model_without_a_tokenizer_is_refused():
    with pytest.raises(UserError, match="tiny-llama ships no tokenizer"):
        tokens.validation_inputs(resolve("tiny-llama"), 1, 8, torch.float32, tokens.Text("mine.txt", "hi", "0"))


def test_an_unreadable_text_is_named_before_anything_is_built(tmp_path, capsys):
    rc = build_main(["--model", "tiny-llama", "--out", str(tmp_path / "e"), "--validate",
                     "--text", str(tmp_path / "missing.txt")])
    assert rc == 2 and "--text" in capsys.readouterr().err and not (tmp_path / "e").exists()
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(UserError, match="latin1.txt: not UTF-8"):
        tokens.read_text(tmp_path / "latin1.txt")


def test_text_without_validate_is_refused(tmp_path, capsys):
    (tmp_path / "t.txt").write_text("w3")
    rc = build_main(["--model", "tiny-llama", "--out", str(tmp_path / "e"), "--text", str(tmp_path / "t.txt")])
    assert rc == 2 and "needs --validate" in capsys.readouterr().err


def test_a_users_text_is_what_the_points_are_fed_and_the_manifest_records_it(tmp_path, capsys):
    """A tiny checkpoint with a word-level tokenizer: the saved Polygraphy inputs are the embedding
    rows of the text's words, and manifest.json names the text, its sha256 and its tokens."""
    model = tmp_path / "tiny-tok"
    write_hf_checkpoint(model)
    write_tokenizer(model, resolve("tiny-llama").config.vocab_size)
    text = tmp_path / "mine.txt"
    text.write_text(" ".join(f"w{3 + (7 * i) % 200}" for i in range(40)))
    profile = write_profile(tmp_path / "profiles", "vtext", "float32")
    out = tmp_path / "e"
    assert build_main(["--model", str(model), "--profile", str(profile), "--out", str(out),
                       "--stop-after", "surgery"]) == 0
    rc = validate_main(["--model", str(model), "--profile", str(profile), "--out", str(out), "--points", "opt",
                        "--text", str(text), "--steps", "2"])
    assert rc == 0, capsys.readouterr().out
    target = out / "tiny-tok" / "vtext"
    record = load_manifest(target)["validation"]["inputs"]
    assert record["kind"] == "text" and record["text"] == "mine.txt" and record["text_tokens"] == 40
    assert record["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    feeds = load_json(str(target / "validation" / "decoder.prefill.inputs.json"))
    hidden = torch.from_numpy(feeds[0]["hidden_in"])            # prefill/opt: N=4 after lastSum=8
    ids = torch.tensor([3 + (7 * i) % 200 for i in range(8, 12)])
    assert torch.equal(hidden[0], _embedding_rows(model, ids))
    assert load_manifest(target)["validation"]["task"]["prompt_tokens"] == 8
