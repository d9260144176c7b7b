"""``kvplan generate``: greedy text through a built target equals transformers' own generate,
in every kv_io mode, and bad input is one line with exit 2."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from test_int4_every_layer import hf_checkpoint

from bench.checkpoint import write_tokenizer
from kvplan.cli import build_main, main
from kvplan.generate import Sampling, pick

PROMPT = "w5 w17 w33 w9 w120 w64"
# (kv_io, kv_format): every way a runtime feeds the cache back.
MODES = [("concat", 0), ("delta", 0), ("delta", 1), ("inplace", 0)]


def profile_file(root: Path, kv_io: str, kv_format: int, dtype: str = "float32") -> Path:
    text = f"""description = "tiny {kv_io}"
[export]
dtype = "{dtype}"
kv_format = {kv_format}
kv_io = "{kv_io}"
[surgery]
passes = ["rmsnorm", "rope", "attention"]
[engine]
[[engine.shapes]]
name = "prefill"
N = [1, 16, 32]
lastSum = [0, 0, 32]
[[engine.shapes]]
name = "decode"
N = [1, 1, 1]
lastSum = [1, 16, 63]
[validate]
atol = 1e-4
rtol = 1e-4
"""
    path = root / f"{kv_io}-{kv_format}.toml"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 3-layer Llama checkpoint with a word-level tokenizer, and a profile file per kv_io mode,
    each built up to its embedding and head graphs."""
    root = tmp_path_factory.mktemp("generate")
    ckpt = hf_checkpoint(root / "llama3")
    write_tokenizer(ckpt, 256)
    profiles = {}
    for kv_io, kv_format in MODES:
        path = profile_file(root, kv_io, kv_format)
        assert build_main(["--model", str(ckpt), "--profile", str(path), "--out", str(root / "out"),
                           "--stop-after", "embed_head"]) == 0
        profiles[kv_io, kv_format] = path
    return ckpt, profiles, root / "out"


def generate(capsys, ckpt, profile, out, *extra) -> tuple[int, str, str]:
    code = main(["generate", "--model", str(ckpt), "--profile", str(profile), "--out", str(out), *extra])
    got = capsys.readouterr()
    return code, got.out, got.err


def transformers_greedy(ckpt: Path, prompt: str, new: int) -> str:
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, do_sample=False, max_new_tokens=new)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@pytest.mark.parametrize("mode", MODES, ids=[f"{m}-{f}" for m, f in MODES])
def test_greedy_text_is_transformers_own_generate_in_every_kv_io_mode(tiny, capsys, mode):
    ckpt, profiles, out = tiny
    code, text, err = generate(capsys, ckpt, profiles[mode], out, "--prompt", PROMPT, "--max-new-tokens", "20")
    assert code == 0, err
    assert text.strip() == transformers_greedy(ckpt, PROMPT, 20).strip()
    assert re.search(r"decode: \d+ tokens in [0-9.]+ s \([0-9.]+ tokens/s\)", err), err


def _traffic(err: str) -> tuple[int, int]:
    m = re.search(r"cache bytes copied per step (\d+), written per step (\d+)", err)
    return int(m.group(1)), int(m.group(2))


def test_inplace_and_delta_decode_steps_copy_no_cache_row(tiny, capsys):
    """A decode step writes one new row per layer and tensor; kv_format 1's delta feeds the buffer's
    first rows as they lie, in-place binds the buffer as input and output."""
    ckpt, profiles, out = tiny
    row = 2 * 3 * 2 * 16 * 4           # K and V of 3 layers, 2 kv heads, head_dim 16, float32
    for mode in (("inplace", 0), ("delta", 1)):
        _, _, err = generate(capsys, ckpt, profiles[mode], out, "--prompt", PROMPT, "--max-new-tokens", "8")
        assert _traffic(err) == (0, row), (mode, err)


def test_concat_rewrites_the_cache_and_format_0_delta_copies_its_rows(tiny, capsys):
    ckpt, profiles, out = tiny
    _, _, err = generate(capsys, ckpt, profiles["concat", 0], out, "--prompt", PROMPT, "--max-new-tokens", "8")
    copied, written = _traffic(err)
    assert copied == 0 and written > 6 * 2 * 3 * 2 * 16 * 4
    _, _, err = generate(capsys, ckpt, profiles["delta", 0], out, "--prompt", PROMPT, "--max-new-tokens", "8")
    assert _traffic(err)[0] > 0


def test_sampling_is_seeded_and_top_1_sampling_is_greedy(tiny, capsys):
    ckpt, profiles, out = tiny
    args = ["--prompt", PROMPT, "--max-new-tokens", "12"]
    runs = [generate(capsys, ckpt, profiles["concat", 0], out, *args, "--temperature", "1.5", "--seed", "3")[1]
            for _ in range(2)]
    assert runs[0] == runs[1]
    greedy = generate(capsys, ckpt, profiles["concat", 0], out, *args)[1]
    top1 = generate(capsys, ckpt, profiles["concat", 0], out, *args, "--temperature", "0.7", "--top-k", "1")[1]
    assert top1 == greedy


def test_pick_reads_a_top_k_head_and_refuses_nan():
    out = {"top_values": torch.tensor([[[5.0, 3.0]]]).numpy(), "top_ids": torch.tensor([[[42, 7]]]).numpy()}
    assert pick(out, Sampling(), None) == 42
    with pytest.raises(Exception, match="non-finite"):
        pick({"logits": torch.tensor([[[float("nan"), 1.0]]]).numpy()}, Sampling(), None)


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], r"--prompt: empty"),
    (["--prompt", " ".join(["w7"] * 70)], r"--prompt: 70 tokens; the target's optimization profiles take at most 64"),
    (["--prompt", PROMPT, "--max-new-tokens", "60"], r"--max-new-tokens 60: .* at most 59"),
    (["--prompt", PROMPT, "--max-new-tokens", "0"], r"--max-new-tokens 0: must be >= 1"),
    (["--prompt", PROMPT, "--chat"], r"has no chat template"),
    (["--prompt", PROMPT, "--temperature", "-1"], r"--temperature -1.0: must be"),
])
def test_bad_input_is_one_line_and_exit_2(tiny, capsys, args, message):
    ckpt, profiles, out = tiny
    code, _, err = generate(capsys, ckpt, profiles["concat", 0], out, *args)
    assert code == 2
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and re.search(message, lines[0]), err


def test_a_checkpoint_without_tokenizer_or_target_is_refused(tiny, capsys, tmp_path):
    ckpt, profiles, out = tiny
    bare = hf_checkpoint(tmp_path / "bare")
    assert build_main(["--model", str(bare), "--profile", str(profiles["concat", 0]), "--out", str(tmp_path / "o"),
                       "--stop-after", "embed_head"]) == 0
    capsys.readouterr()
    code, _, err = generate(capsys, bare, profiles["concat", 0], tmp_path / "o", "--prompt", PROMPT)
    assert code == 2 and "ships no tokenizer" in err
    code, _, err = generate(capsys, ckpt, profiles["concat", 0], tmp_path / "nothing", "--prompt", PROMPT)
    assert code == 2 and "nothing was generated or rebuilt" in err
