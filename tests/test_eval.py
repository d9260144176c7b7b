"""``kvplan eval``: perplexity of a text through the built graphs, against transformers' own."""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from test_int4_every_layer import hf_checkpoint

from bench.checkpoint import write_tokenizer
from kvplan import profiles
from kvplan.cli import build_main, main

WORDS = " ".join(f"w{i}" for i in torch.randint(3, 256, (300,), generator=torch.Generator().manual_seed(0)).tolist())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer Llama checkpoint with a word-level tokenizer, built in fp32 up to surgery."""
    root = tmp_path_factory.mktemp("eval")
    ckpt = hf_checkpoint(root / "llama3")
    write_tokenizer(ckpt, 256)
    text = root / "words.txt"
    text.write_text(WORDS)
    assert build_main(["--model", str(ckpt), "--profile", "fp32", "--out", str(root / "out"),
                       "--stop-after", "surgery"]) == 0
    return ckpt, text, root / "out"


def transformers_perplexity(ckpt: Path, text: Path, tokens: int) -> float:
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    ids = torch.tensor([tok(text.read_text())["input_ids"][:tokens]])
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    with torch.no_grad():
        return math.exp(float(model(ids, labels=ids).loss))


def run_eval(capsys, *argv) -> tuple[int, list[str]]:
    code = main(["eval", *argv])
    return code, capsys.readouterr().out.strip().splitlines()


def test_perplexity_through_the_fused_graph_is_transformers_own(tiny, capsys, tmp_path):
    ckpt, text, out = tiny
    code, lines = run_eval(capsys, "--model", str(ckpt), "--profile", "fp32", "--out", str(out), "--text", str(text),
                           "--tokens", "200", "--json", str(tmp_path / "eval.json"))
    assert code == 0
    last = re.fullmatch(r"perplexity: ([0-9.]+) \(199 tokens\)", lines[-1])
    assert last, lines[-1]
    want = transformers_perplexity(ckpt, text, 200)
    assert float(last.group(1)) == pytest.approx(want, rel=1e-4)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["graphs"] == ["decoder.fused.onnx"] and result["chunk"] == 512
    assert result["reference"]["top1_agreement"] == 1.0 and result["reference"]["mean_kl"] < 1e-6


def test_chunks_feed_the_cache_back(tiny, capsys, tmp_path):
    """Chunks of 64 tokens on top of the cache the chunks before them left score what one chunk does."""
    ckpt, text, out = tiny
    mine = tmp_path / "fp32-chunks.toml"
    mine.write_text((profiles.PROFILES_DIR / "fp32.toml").read_text().replace("N = [1, 303, 512]", "N = [1, 32, 64]"))
    assert build_main(["--model", str(ckpt), "--profile", str(mine), "--out", str(out), "--stop-after", "surgery"]) == 0
    code, lines = run_eval(capsys, "--model", str(ckpt), "--profile", str(mine), "--out", str(out), "--text",
                           str(text), "--tokens", "200", "--no-reference")
    assert code == 0 and "in chunks of 64" in "\n".join(lines)
    assert float(lines[-1].split()[1]) == pytest.approx(transformers_perplexity(ckpt, text, 200), rel=1e-4)


@pytest.mark.parametrize("kv_io", ["delta", "inplace"])
def test_every_kv_io_mode_scores_the_same_text_alike(tiny, capsys, tmp_path, kv_io):
    ckpt, text, out = tiny
    mine = tmp_path / f"fp32-{kv_io}.toml"
    mine.write_text((profiles.PROFILES_DIR / "fp32.toml").read_text().replace('kv_io = "concat"', f'kv_io = "{kv_io}"'))
    assert build_main(["--model", str(ckpt), "--profile", str(mine), "--out", str(out), "--stop-after", "surgery"]) == 0
    code, lines = run_eval(capsys, "--model", str(ckpt), "--profile", str(mine), "--out", str(out), "--text",
                           str(text), "--tokens", "200", "--no-reference")
    assert code == 0
    assert float(lines[-1].split()[1]) == pytest.approx(transformers_perplexity(ckpt, text, 200), rel=1e-4)


def test_a_target_not_built_is_refused_and_nothing_is_built(tiny, capsys, tmp_path):
    ckpt, text, _ = tiny
    assert main(["eval", "--model", str(ckpt), "--profile", "fp32", "--out", str(tmp_path), "--text", str(text)]) == 2
    assert "nothing built here" in capsys.readouterr().err
    assert not (tmp_path / "llama3").exists()


def test_more_tokens_than_the_profiles_positions_are_refused(tiny, capsys, tmp_path):
    ckpt, _, out = tiny
    long = tmp_path / "long.txt"
    long.write_text(WORDS * 20)
    assert main(["eval", "--model", str(ckpt), "--profile", "fp32", "--out", str(out), "--text", str(long),
                 "--tokens", "5000"]) == 2
    assert "take at most 4096 positions" in capsys.readouterr().err


def test_a_missing_text_or_a_checkpoint_without_tokenizer_is_one_line(tiny, capsys, tmp_path):
    ckpt, text, out = tiny
    assert main(["eval", "--model", str(ckpt), "--profile", "fp32", "--out", str(out), "--text",
                 str(tmp_path / "none.txt")]) == 2
    assert "none.txt: no such file" in capsys.readouterr().err
    bare = hf_checkpoint(tmp_path / "bare")
    assert build_main(["--model", str(bare), "--profile", "fp32", "--out", str(tmp_path / "o"),
                       "--stop-after", "surgery"]) == 0
    capsys.readouterr()
    assert main(["eval", "--model", str(bare), "--profile", "fp32", "--out", str(tmp_path / "o"), "--text",
                 str(text)]) == 2
    assert "ships no tokenizer" in capsys.readouterr().err


@pytest.mark.slow
def test_the_real_models_fp16_graph_scores_within_one_percent_of_transformers_float32(smollm2_checkpoint, tmp_path,
                                                                                    capsys):
    text = tmp_path / "text.txt"
    text.write_text((Path(__file__).parent.parent / "README.md").read_text())
    assert build_main(["--model", str(smollm2_checkpoint), "--profile", "fp16", "--out", str(tmp_path),
                       "--stop-after", "surgery"]) == 0
    code, lines = run_eval(capsys, "--model", str(smollm2_checkpoint), "--profile", "fp16", "--out", str(tmp_path),
                           "--text", str(text), "--tokens", "1024", "--json", str(tmp_path / "e.json"))
    assert code == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["perplexity"] == pytest.approx(result["reference"]["perplexity"], rel=0.01)
    assert result["reference"]["top1_agreement"] > 0.98


def test_a_target_with_embedding_and_head_graphs_is_scored_through_them(tiny, capsys, tmp_path):
    ckpt, text, _ = tiny
    out = tmp_path / "out"
    assert build_main(["--model", str(ckpt), "--profile", "fp32", "--out", str(out), "--stop-after", "embed_head"]) == 0
    capsys.readouterr()
    code, lines = run_eval(capsys, "--model", str(ckpt), "--profile", "fp32", "--out", str(out), "--text", str(text),
                           "--tokens", "200", "--json", str(tmp_path / "eval.json"))
    assert code == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["ends"] == "embed.onnx, head.onnx"
    assert result["perplexity"] == pytest.approx(transformers_perplexity(ckpt, text, 200), rel=1e-4)
