"""The task check's TensorRT stack, driven by a runner with the TrtRunner interface (set_profile,
infer on the contract's feed dict) over transformers' own model: which optimization profile
each step selects, outputs read by name whatever order the engine lists them in, and bfloat16."""
from __future__ import annotations

from collections import OrderedDict

import pytest
import torch

from kvplan import profiles
from kvplan.decoder import pack_specs
from kvplan.export.exporter import io_contract
from kvplan.models import resolve
from kvplan.validate.reference import HFReference
from kvplan.validate.runners import ReferenceRunner
from kvplan.validate.task import TrtStack, run_task_checks, tightest_profile


class EngineOrderRunner:
    """transformers' model behind the TrtRunner interface, its outputs listed last to first (an
    engine's output order need not be the graph's), recording every profile it is switched to."""

    def __init__(self, inner):
        self.inner, self.selected = inner, []

    def set_profile(self, index: int) -> None:
        self.selected.append(index)

    def infer(self, feed):
        out = self.inner.infer(feed, check_inputs=False)
        return OrderedDict(reversed(list(out.items())))


def _stack(dtype: torch.dtype, name: str):
    source = resolve("tiny-llama")
    profile = profiles.load("fp16")
    [spec] = pack_specs(source.config, 0, 0)
    contract = io_contract(source.config, spec, 1, name)
    runner = ReferenceRunner(HFReference(source, dtype), spec, contract)
    runner.activate()
    wrapped = EngineOrderRunner(runner)
    return source, profile, TrtStack([wrapped], [spec], profile), wrapped


def test_decode_steps_select_the_decode_profile():
    """The prefill profile's ranges (N 1..512, lastSum 0..3584) hold every decode step too; a
    runtime picks the decode profile for them, and so must the task check."""
    shapes = profiles.load("fp16").shapes
    assert [sp.name for sp in shapes] == ["prefill", "decode"]
    assert tightest_profile(shapes, 8, 0) == 0
    assert tightest_profile(shapes, 1, 0) == 0          # lastSum 0 is outside decode's range
    assert tightest_profile(shapes, 1, 302) == 1
    with pytest.raises(ValueError, match="outside every optimization profile"):
        tightest_profile(shapes, 600, 0)


@pytest.mark.parametrize("dtype, name", [(torch.float16, "float16"), (torch.bfloat16, "bfloat16")])
def test_teacher_forced_run_through_the_tensorrt_stack(dtype, name):
    """Outputs are taken by name (the runner lists them in reverse), the prompt runs on the prefill
    profile and every later step on decode, and bfloat16 runs (numpy has no bfloat16)."""
    source, profile, stack, runner = _stack(dtype, name)
    result = run_task_checks(source, dtype, {"tensorrt": stack}, steps=5, prompt=[3, 1, 4, 1, 5, 9], tol=profile.validate,
                             log=lambda *_: None)
    r = result["stacks"]["tensorrt"]
    assert r["ran"], r
    assert r["agreement"] == 1.0 and r["passed_tolerance"]
    assert max(r["hidden_max_abs_per_step"]) == 0.0      # the same model on the same inputs
    assert runner.selected == [0, 1]                     # switched once to prefill, once to decode


class NaNRunner(EngineOrderRunner):
    """A stack whose hidden_out is NaN: what a graph built from NaN weights produces."""

    def infer(self, feed):
        out = super().infer(feed)
        out["hidden_out"] = torch.full_like(torch.as_tensor(out["hidden_out"]), float("nan")).numpy()
        return out


def test_nan_outputs_never_count_as_agreement_or_within_tolerance():
    source, profile, _, runner = _stack(torch.float16, "float16")
    stack = TrtStack([NaNRunner(runner.inner)], pack_specs(source.config, 0, 0), profile)
    result = run_task_checks(source, torch.float16, {"tensorrt": stack}, steps=4, prompt=[2, 7, 1],
                             tol=profile.validate, log=lambda *_: None)
    r = result["stacks"]["tensorrt"]
    assert r["ran"] and r["agreement"] == 0.0 and not r["passed_tolerance"]
    assert r["first_step_over_tolerance"] == 0 and r["first_divergence"] == 0
