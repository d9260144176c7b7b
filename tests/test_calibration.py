"""AWQ calibration a user can give: a text (the checkpoint's tokenizer), the model's own text, or a file."""
from __future__ import annotations

import math
import re

import pytest
import torch
import transformers
from safetensors.torch import save_file
from test_int4_every_layer import hf_checkpoint
from test_quantize import write_profile

from kvplan import profiles
from kvplan.cli import build_main
from kvplan.errors import QuantizeError
from kvplan.models import resolve
from kvplan.profiles import Quantize
from kvplan.quantize.calibration import calibration_hidden
from kvplan.quantize.calibration import resolve as resolve_calibration

TEXT = ("A build system turns sources into artifacts and rebuilds only what changed. "
        "It records what each step read, so that a second run with nothing changed does nothing. ") * 20


@pytest.fixture(scope="module")
def smollm2(smollm2_checkpoint):
    return resolve(str(smollm2_checkpoint))


def test_a_text_is_tokenized_with_the_checkpoints_tokenizer_and_embedded_with_its_embedding(smollm2, tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    hidden = calibration_hidden(smollm2, Quantize(method="awq", calibration=f"text:{path}", samples=3, tokens=16))
    ids = transformers.AutoTokenizer.from_pretrained(str(smollm2.path))(TEXT, add_special_tokens=False)["input_ids"]
    embedding = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2.path)).get_input_embeddings().weight
    want = embedding[torch.tensor(ids[:48]).reshape(3, 16)].float()
    torch.testing.assert_close(hidden, want, atol=0, rtol=0)


def test_a_txt_path_is_a_text(smollm2, tmp_path):
    assert resolve_calibration(str(tmp_path / "notes.txt"), smollm2).kind == "text"


def test_a_text_shorter_than_samples_times_tokens_is_refused_not_cut(smollm2, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("Too short.")
    with pytest.raises(QuantizeError, match=rf"{re.escape(str(path))}: \d tokens, fewer than quantize.samples x "
                                            rf"quantize.tokens = 8 x 128 = 1024"):
        calibration_hidden(smollm2, Quantize(method="awq", calibration=f"text:{path}"))


def test_text_calibration_of_a_checkpoint_without_a_tokenizer_is_refused_naming_it(tmp_path):
    source = resolve(str(hf_checkpoint(tmp_path / "bare")))
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    with pytest.raises(QuantizeError, match=r"text calibration needs the checkpoint's tokenizer, and .*bare ships "
                                            r"none"):
        calibration_hidden(source, Quantize(method="awq", calibration=f"text:{path}"))


def _perplexity(model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        logits = model(ids).logits[:, :-1].float()
    return math.exp(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)))


def test_the_model_writes_its_own_calibration_text(smollm2):
    from kvplan.quantize import generated
    tok = smollm2.tokenizer().backend
    ids = generated.sample_ids(smollm2, 2, 24, seed=0, start=tok.bos_token_id, banned=tuple(tok.all_special_ids),
                               log=lambda _: None)
    assert ids.shape == (2, 24) and bool((ids[:, 0] == tok.bos_token_id).all())
    assert not set(ids[:, 1:].flatten().tolist()) & set(tok.all_special_ids)
    assert torch.equal(ids, generated.sample_ids(smollm2, 2, 24, seed=0, start=tok.bos_token_id,
                                                 banned=tuple(tok.all_special_ids), log=lambda _: None))
    # The text is the model's own: transformers finds it far likelier than random tokens.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(smollm2.path), dtype=torch.float32)
    random_ids = torch.randint(0, smollm2.config.vocab_size, ids.shape, generator=torch.Generator().manual_seed(0))
    assert _perplexity(model, ids) < 50 < 1000 < _perplexity(model, random_ids)


def test_auto_is_self_for_a_checkpoint_with_an_lm_head_and_synthetic_for_presets(smollm2):
    assert resolve_calibration("auto", smollm2).kind == "self"
    assert resolve_calibration("auto", resolve("tiny-llama")).kind == "synthetic"
    assert profiles.load("int4-awq").quantize.calibration == "auto"


def test_a_checkpoint_calibrated_on_synthetic_hidden_states_is_warned(tmp_path, capsys):
    ckpt = hf_checkpoint(tmp_path / "narrow")
    profile = write_profile(tmp_path, group_size="32", calibration='"synthetic"', samples="1", tokens="16")
    assert build_main(["--model", str(ckpt), "--profile", profile, "--out", str(tmp_path / "out"),
                       "--stop-after", "quantize"]) == 0
    assert "warning: " in capsys.readouterr().out


@pytest.mark.parametrize("tensor", [{"hidden_states": torch.randn(4, 63, 64)}, {"input_ids": torch.zeros(3, 64,
                                                                                                       dtype=torch.long)}])
def test_a_calibration_file_smaller_than_samples_times_tokens_is_refused(tmp_path, tensor):
    path = tmp_path / "calib.safetensors"
    save_file(tensor, str(path))
    with pytest.raises(QuantizeError, match=rf"{re.escape(str(path))}: tensor '\w+' is \[\d, \d+(, 64)?\], smaller "
                                            r"than quantize.samples x quantize.tokens = 4 x 64"):
        calibration_hidden(resolve("tiny-llama"), Quantize(method="awq", calibration=str(path), samples=4, tokens=64))


def test_a_calibration_file_holding_nan_is_refused(tmp_path):
    path = tmp_path / "calib.safetensors"
    hidden = torch.randn(4, 64, 64)
    hidden[1, 2, 3] = float("nan")
    save_file({"hidden_states": hidden}, str(path))
    with pytest.raises(QuantizeError, match=r"tensor 'hidden_states' holds 1 NaN or infinite value"):
        calibration_hidden(resolve("tiny-llama"), Quantize(method="awq", calibration=str(path), samples=4, tokens=64))


def test_a_profiles_text_file_is_found_beside_the_profile(tmp_path):
    profile = write_profile(tmp_path, calibration='"text:notes.txt"')
    assert profiles.load(profile).quantize.calibration == f"text:{(tmp_path / 'notes.txt').resolve()}"
