"""A checkpoint's own tokenizer, reached through its model source."""
from __future__ import annotations

import pytest

from bench.checkpoint import write_tokenizer
from kvplan.errors import ModelError
from kvplan.models import resolve
from kvplan.models.tokenizer import load_tokenizer


def test_a_checkpoint_with_a_tokenizer_offers_it(smollm2_checkpoint):
    tok = resolve(str(smollm2_checkpoint)).tokenizer()
    ids = tok.encode("Paris is the capital of")
    assert ids == [38634, 314, 260, 3575, 282]          # what the GGUF's own vocabulary gives
    assert tok.decode(ids) == "Paris is the capital of"
    assert tok.eos_ids == (2,)
    assert tok.decode(tok.chat("Hi")).rstrip().endswith("user\nHi\nassistant")


def test_a_preset_has_no_tokenizer():
    assert resolve("tiny-llama").tokenizer is None


def test_a_word_level_tokenizer_written_beside_a_checkpoint_loads(tmp_path):
    write_tokenizer(tmp_path, 64)
    tok = load_tokenizer(tmp_path)
    assert tok.encode("w3 w4 w5", special=False) == [3, 4, 5]
    with pytest.raises(ModelError, match="no chat template"):
        tok.chat("w3")


def test_an_unreadable_tokenizer_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer cannot be loaded"):
        load_tokenizer(tmp_path)
