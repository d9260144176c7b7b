"""The reference with streamed layers: transformers' whole CausalLM, each layer's weights read as
it runs and let go after, computes what the model held whole computes."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from kvplan.models import resolve
from kvplan.validate.reference import HFReference


def _logits(ref: HFReference, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return ref.model(input_ids=ids).logits


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma2"])
def test_streamed_layers_give_the_held_models_logits(name):
    source = resolve(name)
    ids = torch.randint(0, source.config.vocab_size, (1, 11), generator=torch.Generator().manual_seed(0))
    held = HFReference(source, torch.float32, with_lm=True)
    streamed = HFReference(source, torch.float32, with_lm=True, stream_layers=True)
    assert torch.equal(_logits(streamed, ids), _logits(held, ids))
    # Twice: the layers read their weights again on the second pass.
    assert torch.equal(_logits(streamed, ids), _logits(held, ids))


def test_streamed_layers_hold_no_weights_between_calls():
    source = resolve("tiny-llama")
    ref = HFReference(source, torch.float32, with_lm=True, stream_layers=True)
    layers = ref.decoder.layers
    assert all(p.is_meta for p in layers.parameters())
    _logits(ref, torch.tensor([[1, 2, 3]]))
    assert all(p.is_meta for p in layers.parameters())
    assert not ref.model.lm_head.weight.is_meta


def test_a_streamed_layer_missing_a_tensor_names_it():
    source = resolve("tiny-llama")
    read = source.read_reference

    def without_up_proj(layers, norm):
        weights = read(layers=layers, norm=norm)
        return {k: v for k, v in weights.items() if not k.endswith("mlp.up_proj.weight")}

    ref = HFReference(dataclasses.replace(source, read_reference=without_up_proj), torch.float32, with_lm=True,
                      stream_layers=True)
    with pytest.raises(ValueError, match=r"no value for the reference's layers\.0\.mlp\.up_proj\.weight"):
        _logits(ref, torch.tensor([[1, 2, 3]]))


def _with_lm(source, embed: torch.Tensor, head: torch.Tensor):
    """``source`` reading these embedding and head matrices (fresh copies each read, as a file gives)."""
    lm = {"embed_tokens.weight": embed, "lm_head.weight": head}
    return dataclasses.replace(source, read_lm=lambda names: {n: lm[n].clone() for n in names})


@pytest.mark.parametrize("change, tied", [(0.0, True), (1e-6, True), (1e-2, False)])
def test_the_head_is_tied_to_the_embedding_where_the_models_values_are_equal(change, tied):
    """A head equal to the embedding once rounded to the graph's fp16 gives the same model tied: one
    matrix, not a second vocabulary-sized float32 copy; one that differs keeps its own."""
    source = resolve("tiny-llama")
    g = torch.Generator().manual_seed(1)
    embed = torch.randn(source.config.vocab_size, source.config.hidden_size, generator=g)
    head = embed.clone()
    head[3, 5] += change * head[3, 5].abs()
    ref = HFReference(_with_lm(source, embed, head), torch.float32, with_lm=True, round_to=torch.float16)
    assert (ref.model.lm_head.weight is ref.model.get_input_embeddings().weight) is tied
    assert torch.equal(ref.model.lm_head.weight, head.half().float())
    assert torch.equal(ref.model.get_input_embeddings().weight, embed.half().float())
