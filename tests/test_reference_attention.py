"""The reference's attention: sdpa where it computes what eager does, eager elsewhere.

transformers' sdpa and eager attention are two implementations of the same math; the
reference may take the faster only if it honours kvplan's additive float masks exactly as
eager does: masked (reserved) slots, the sliding window of Mistral, and a row that sees
nothing. Each case runs both on the same real past and the same feed, in float32.
"""
from __future__ import annotations

import pytest
import torch

from kvplan.export.exporter import causal_mask
from kvplan.models import resolve
from kvplan.models.families import FAMILIES
from kvplan.validate.points import reserve_slots
from kvplan.validate.reference import HFReference

SDPA_FAMILIES = sorted(n for n in FAMILIES if not FAMILIES[n].tiny.attn_softcap)
N, LAST = 4, 9


def _step_both(name: str, mask_fn):
    """hidden_out and the cache of one step of N tokens after LAST, under eager and sdpa."""
    source = resolve(f"tiny-{name}")
    cfg = source.config
    eager = HFReference(source, torch.float32, attention="eager")
    sdpa = HFReference(source, torch.float32, attention="sdpa")
    prefill = eager.prefill(torch.randn(1, LAST, cfg.hidden_size, generator=torch.Generator().manual_seed(0)))
    past = eager.cache_tensors(prefill, cfg.num_layers)
    hidden = torch.randn(1, N, cfg.hidden_size, generator=torch.Generator().manual_seed(3))
    mask = mask_fn(causal_mask(1, N, LAST, torch.float32, window=cfg.sliding_window))
    pos = torch.arange(LAST, LAST + N)[None]
    out = []
    for ref in (eager, sdpa):
        cache = ref.new_cache()
        for i in range(cfg.num_layers):
            cache.update(past[2 * i].clone(), past[2 * i + 1].clone(), i)
        r = ref.step(hidden, mask, pos, cache)
        out.append([r.hidden] + r.past)
    return out


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


@pytest.mark.parametrize("name", SDPA_FAMILIES)
def test_sdpa_honours_masked_slots_as_eager_does(name):
    eager, sdpa = _step_both(name, lambda m: reserve_slots(m, LAST))
    assert _max_diff(eager, sdpa) < 1e-5


def test_sdpa_honours_mistrals_sliding_window_as_eager_does():
    """tiny-mistral's window (6) is shorter than lastSum + N: every query leaves keys behind."""
    assert 0 < FAMILIES["mistral"].tiny.sliding_window < LAST
    eager, sdpa = _step_both("mistral", lambda m: m)
    assert _max_diff(eager, sdpa) < 1e-5


@pytest.mark.parametrize("name", ["llama", "mistral"])
def test_a_row_that_sees_nothing_is_the_same_under_sdpa_and_eager(name):
    """Every key of one query masked (finfo.min everywhere): both spread it evenly, neither NaN."""
    def blind(m):
        m = m.clone()
        m[..., 1, :] = torch.finfo(m.dtype).min
        return m
    eager, sdpa = _step_both(name, blind)
    assert not any(torch.isnan(t).any() for t in eager + sdpa)
    assert _max_diff(eager, sdpa) < 1e-5


def test_the_reference_takes_sdpa_where_exact_and_eager_for_soft_capped_logits():
    assert HFReference(resolve("tiny-llama")).attention == "sdpa"
    assert HFReference(resolve("tiny-gemma2")).attention == "eager"


def test_an_unknown_attention_is_refused_naming_it():
    with pytest.raises(ValueError, match="'flash'"):
        HFReference(resolve("tiny-llama"), attention="flash")
