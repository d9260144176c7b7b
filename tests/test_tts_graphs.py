"""MiniCPM-o's TTS audio ends: embed_audio.onnx (audio codes -> hidden_in) and head_audio.onnx
(hidden_out -> per-codebook logits), read from a MiniCPM-o-2_6 checkpoint directory.

The reference is built from torch's own modules, as ConditionalChatTTS builds them: an
nn.Embedding per codebook (summed as torch.stack(..., 3).sum(3)), and per codebook a
parametrizations.weight_norm(nn.Linear) whose g and v are loaded from the tensors the checkpoint
was written with (never from kvplan's folding), its logits stacked on the last axis.
"""
from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
import test_models
import torch
from test_models import minicpmo_config, write_hf_dir
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from kvplan.embed_head.tts import audio_embed_graph, audio_head_graph
from kvplan.models import ModelError, resolve
from kvplan.models.families import hf_config_dict
from kvplan.models.tts_tensors import TTS_DEFAULTS, fold_weight_norm, tts_tensor_names

NUM_VQ, AUDIO, TEXT, HIDDEN = 3, 37, 50, 128     # hidden: tiny-llama-outliers', the decoder written beside them (a TTS
# decoder has as many key/value heads as attention heads)
SPELLINGS = {"parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
             "weight_norm": ("weight_g", "weight_v")}
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16}
reads = test_models.reads       # the fixture recording every tensor read from a safetensors file


def tts_tensors(spelling: str) -> dict[str, torch.Tensor]:
    """The TTS's tensors beside its LlamaModel, in bfloat16 as MiniCPM-o-2_6 ships them."""
    gen = torch.Generator().manual_seed(0)
    g_name, v_name = SPELLINGS[spelling]
    out = {"tts.emb_text.weight": torch.randn(TEXT, HIDDEN, generator=gen)}
    for i in range(NUM_VQ):
        out[f"tts.emb_code.{i}.weight"] = torch.randn(AUDIO, HIDDEN, generator=gen)
        out[f"tts.head_code.{i}.{g_name}"] = torch.rand(AUDIO, 1, generator=gen) + 0.5
        out[f"tts.head_code.{i}.{v_name}"] = torch.randn(AUDIO, HIDDEN, generator=gen)
    return {k: v.to(torch.bfloat16) for k, v in out.items()}


def write_minicpmo(directory, spelling: str, drop: str | None = None) -> dict[str, torch.Tensor]:
    """A tiny MiniCPM-o-2_6 directory (the TTS decoder under tts.model.*, sharded with an index);
    returns the TTS tensors it was written with (less ``drop``)."""
    tts = {k: v for k, v in hf_config_dict(resolve("tiny-llama-outliers").config).items()
           if k not in ("model_type", "architectures")}
    tts |= {"model_type": "conditional_chattts", "num_vq": NUM_VQ, "num_audio_tokens": AUDIO,
            "num_text_tokens": TEXT}
    extra = {k: v for k, v in tts_tensors(spelling).items() if k != drop}
    write_hf_dir(directory, "tiny-llama-outliers", shards=2, prefix="tts.model.", config=minicpmo_config(tts), extra=extra)
    return extra


@pytest.fixture(params=list(SPELLINGS))
def checkpoint(request, tmp_path):
    tensors = write_minicpmo(tmp_path / "MiniCPM-o-2_6", request.param)
    return tmp_path / "MiniCPM-o-2_6", request.param, tensors


def run(graph, feeds: dict) -> list[np.ndarray]:
    session = ort.InferenceSession(ir.to_proto(graph.model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def reference_heads(tensors: dict, spelling: str, dtype: torch.dtype) -> list[nn.Module]:
    """ConditionalChatTTS.head_code: weight_norm(nn.Linear(hidden, num_audio_tokens, bias=False)) per
    codebook, g and v loaded as the checkpoint holds them."""
    g_name, v_name = SPELLINGS[spelling]
    heads = []
    for i in range(NUM_VQ):
        head = weight_norm(nn.Linear(HIDDEN, AUDIO, bias=False), name="weight")
        head.load_state_dict({"parametrizations.weight.original0": tensors[f"tts.head_code.{i}.{g_name}"],
                              "parametrizations.weight.original1": tensors[f"tts.head_code.{i}.{v_name}"]})
        heads.append(head.to(dtype))
    return heads


def reference_logits(heads: list[nn.Module], hidden: torch.Tensor) -> torch.Tensor:
    """ConditionalChatTTS.generate's arrangement: logits[..., i] = head_code[i](hidden)."""
    logits = torch.empty(hidden.shape[0], hidden.shape[1], AUDIO, NUM_VQ, dtype=torch.float)
    with torch.no_grad():
        for i, head in enumerate(heads):
            logits[..., i] = head(hidden)
    return logits


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_an_audio_step_embeds_as_the_sum_of_its_codebooks_rows(checkpoint, dtype):
    directory, _, tensors = checkpoint
    tts = resolve(str(directory)).read_tts()
    ids = torch.randint(0, AUDIO, (2, 5, NUM_VQ), generator=torch.Generator().manual_seed(1))
    [got] = run(audio_embed_graph(tts["emb_code"], dtype, "B"), {"audio_ids": ids.numpy()})

    emb_code = [nn.Embedding(AUDIO, HIDDEN).to(TORCH_DTYPES[dtype]) for _ in range(NUM_VQ)]
    for i, emb in enumerate(emb_code):
        emb.load_state_dict({"weight": tensors[f"tts.emb_code.{i}.weight"]})
    with torch.no_grad():
        want = torch.stack([emb_code[i](ids[:, :, i]) for i in range(NUM_VQ)], 3).sum(3)
    assert got.shape == (2, 5, HIDDEN) and got.dtype == want.numpy().dtype
    if dtype == "float16":      # torch sums half codebooks in float32 and rounds once: so does the graph
        np.testing.assert_array_equal(got, want.numpy())
    else:
        np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_audio_logits_stack_the_codebooks_on_the_last_axis(checkpoint, dtype):
    directory, spelling, tensors = checkpoint
    tts = resolve(str(directory)).read_tts()
    graph = audio_head_graph(tts["head_code"], dtype, "B")
    hidden = torch.randn(2, 4, HIDDEN, generator=torch.Generator().manual_seed(2)).to(TORCH_DTYPES[dtype])
    [got] = run(graph, {"hidden_out": hidden.numpy()})

    want = reference_logits(reference_heads(tensors, spelling, TORCH_DTYPES[dtype]), hidden)
    assert graph.contract["outputs"] == {"audio_logits": {"shape": ["B", "N", AUDIO, NUM_VQ], "dtype": dtype}}
    assert got.shape == (2, 4, AUDIO, NUM_VQ)
    tolerance = {"float32": 2e-5, "float16": 1e-2}[dtype]
    np.testing.assert_allclose(got.astype(np.float32), want.numpy(), rtol=0, atol=tolerance)


def test_last_only_gives_the_last_positions_logits(checkpoint):
    directory, spelling, tensors = checkpoint
    tts = resolve(str(directory)).read_tts()
    graph = audio_head_graph(tts["head_code"], "float32", 1, last_only=True)
    hidden = torch.randn(1, 6, HIDDEN, generator=torch.Generator().manual_seed(3))
    [got] = run(graph, {"hidden_out": hidden.numpy()})
    want = reference_logits(reference_heads(tensors, spelling, torch.float32), hidden)[:, -1:]
    assert graph.contract["outputs"]["audio_logits"]["shape"] == [1, 1, AUDIO, NUM_VQ]
    assert got.shape == (1, 1, AUDIO, NUM_VQ)
    np.testing.assert_allclose(got, want.numpy(), rtol=0, atol=2e-5)


def test_the_folded_head_is_torchs_weight_norm_weight(checkpoint):
    _, spelling, tensors = checkpoint
    g_name, v_name = SPELLINGS[spelling]
    for i, head in enumerate(reference_heads(tensors, spelling, torch.float32)):
        folded = fold_weight_norm(tensors[f"tts.head_code.{i}.{g_name}"], tensors[f"tts.head_code.{i}.{v_name}"])
        assert folded.dtype == torch.float32
        torch.testing.assert_close(folded, head.weight.detach(), rtol=0, atol=1e-6)


def test_reads_only_the_tts_audio_tensors(checkpoint, reads):
    directory, spelling, _ = checkpoint
    source = resolve(str(directory))
    reads.clear()
    tts = source.read_tts()
    g_name, v_name = SPELLINGS[spelling]
    assert sorted(reads) == sorted([f"tts.emb_code.{i}.weight" for i in range(NUM_VQ)]
                                   + [f"tts.head_code.{i}.{n}" for i in range(NUM_VQ) for n in (g_name, v_name)])
    assert tts["tts_config"] == {"hidden_size": HIDDEN, "num_audio_tokens": AUDIO, "num_text_tokens": TEXT,
                                 "num_vq": NUM_VQ}
    assert [t.shape for t in tts["emb_code"] + tts["head_code"]] == [(AUDIO, HIDDEN)] * (2 * NUM_VQ)


@pytest.mark.parametrize("drop", ["tts.head_code.1.parametrizations.weight.original1",
                                  "tts.head_code.2.parametrizations.weight.original0"])
def test_a_missing_head_tensor_is_named_when_the_heads_are_read(tmp_path, drop):
    directory = tmp_path / "MiniCPM-o-2_6"
    write_minicpmo(directory, "parametrizations", drop=drop)
    source = resolve(str(directory))        # the decoder alone does not need the heads
    with pytest.raises(ModelError, match=rf"model.safetensors.index.json: tensor '{drop}' is missing \(its "
                                         r"weight-norm partner 'tts.head_code.\d.parametrizations.weight.original\d' "
                                         r"is there\)$"):
        source.read_tts()


def test_a_head_in_neither_weight_norm_spelling_names_both():
    available = {f"tts.emb_code.{i}.weight" for i in range(2)} | {"tts.head_code.0.weight_g",
                                                                  "tts.head_code.0.weight_v"}
    with pytest.raises(ModelError, match=r"ckpt: tensor 'tts.head_code.1.parametrizations.weight.original0' is "
                                         r"missing \(nor is there the old weight_norm's 'tts.head_code.1.weight_g'\)"):
        tts_tensor_names({"num_vq": 2}, available, "ckpt")


def test_sizes_tts_config_omits_are_conditional_chat_tts_configs_defaults():
    assert TTS_DEFAULTS == {"hidden_size": 768, "num_audio_tokens": 626, "num_text_tokens": 21178, "num_vq": 4}
    available = {f"tts.emb_code.{i}.weight" for i in range(4)} | {
        f"tts.head_code.{i}.parametrizations.weight.original{j}" for i in range(4) for j in (0, 1)}
    assert len(tts_tensor_names({"model_type": "conditional_chattts", "llm_dim": 3584}, available)) == 12


def test_a_head_whose_shape_disagrees_with_tts_config_names_the_tensor_and_the_field(tmp_path):
    directory = tmp_path / "MiniCPM-o-2_6"
    write_minicpmo(directory, "weight_norm")
    config = json.loads((directory / "config.json").read_text())
    config["tts_config"]["num_audio_tokens"] = AUDIO + 1
    (directory / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match=r"safetensors: tensor 'tts.emb_code.0.weight' is \[37, 128\], but .*"
                                         r"config.json's tts_config.num_audio_tokens = 38 and hidden_size = 128 "
                                         r"need \[38, 128\]"):
        resolve(str(directory)).read_tts()
