"""Task-level checks: teacher-forced greedy token agreement and multi-step drift.

One loop serves both: the reference (transformers' CausalLM with its own cache)
generates greedy tokens; each candidate stack (ONNX Runtime on the exported and
fused graphs, TensorRT where runnable) is fed the *same* token prefix (teacher
forcing, so one early flip does not derail every later step) while carrying its
own flattened cache, and at every step we record whether its top-1 token agrees
and how far its hidden_out is from the reference's.
"""
from __future__ import annotations

import time

import numpy as np

from kvplan import cache_io
from kvplan.export.exporter import causal_mask, output_names
from kvplan.lazy import lazy_import
from kvplan.pipeline import release_memory
from kvplan.validate.points import as_float32
from kvplan.validate.reference import HFReference

torch = lazy_import("torch")


def tightest_profile(shapes, n: int, last: int) -> int:
    """Index of the optimization profile a runtime would pick for a step of ``n`` tokens after
    ``last``: of those whose ranges hold it, the narrowest (the decode profile for N = 1, although
    the prefill profile's ranges hold every decode step too); the first of equals."""
    fitting = [i for i, sp in enumerate(shapes)
               if sp.N.min <= n <= sp.N.max and sp.lastSum.min <= last <= sp.lastSum.max]
    if not fitting:
        raise ValueError(f"(N={n}, lastSum={last}) is outside every optimization profile of the engine")

    def area(i: int) -> int:
        sp = shapes[i]
        return (sp.N.max - sp.N.min + 1) * (sp.lastSum.max - sp.lastSum.min + 1)

    return min(fitting, key=lambda i: (area(i), i))


def _layout(t, kv_format: int):
    # [B, S, kv, D] <-> [B, kv, S, D], for numpy arrays and (bfloat16) torch tensors alike.
    if kv_format != 1:
        return t
    if isinstance(t, torch.Tensor):
        return t.transpose(1, 2).contiguous()
    return np.ascontiguousarray(t.transpose(0, 2, 1, 3))


def _host(value):
    """A runner's output on the host: numpy stays numpy; torch (bfloat16, which numpy lacks) stays torch."""
    return value.cpu() if isinstance(value, torch.Tensor) else np.asarray(value)


class TrtStack:
    """Packs as TensorRT engines via Polygraphy's TrtRunner, on the profile a runtime would pick
    for each step (tightest_profile); outputs are read by name, not by the engine's order."""

    def __init__(self, runners, specs, profile):
        self.runners, self.specs, self.profile = runners, specs, profile
        self.active = [None] * len(runners)

    def step(self, hidden, mask, pos, past):
        n = hidden.shape[1]
        index = tightest_profile(self.profile.shapes, n, mask.shape[-1] - n)
        new_past = []
        for j, (runner, spec) in enumerate(zip(self.runners, self.specs)):
            if self.active[j] != index:
                runner.set_profile(index)
                self.active[j] = index
            feed = cache_io.graph_feed(spec, hidden, mask, pos, lambda i, kind, spec=spec: _layout(past[2 * i + kind],
                                                                                         spec.kv_format))
            outs = runner.infer(feed)
            names = output_names(spec)
            hidden = _host(outs[names[0]])
            for k, name in enumerate(names[1:]):
                i, kind = spec.layers[k // 2], k % 2
                t = _layout(_host(outs[name]), spec.kv_format)
                new_past.append(cache_io.cache_after(spec, t, past[2 * i + kind], n))
        return hidden, new_past

    def run_steps(self, steps: list[tuple], past: list) -> list:
        """Every step's hidden_out, step by step (the engines hold the whole stack)."""
        out = []
        for hidden, mask, pos in steps:
            hidden, past = self.step(hidden, mask, pos, past)
            out.append(hidden)
        return out


def reference_greedy(ref, prompt: torch.Tensor, steps: int):
    """Greedy tokens and per-step hidden states (after the final norm) of transformers' model."""
    cache = ref.new_cache()
    embed, head = ref.model.get_input_embeddings(), ref.model.lm_head
    tokens, hiddens, last = [], [], 0
    inp = prompt
    with torch.no_grad():
        for _ in range(steps):
            n = inp.shape[1]
            # No mask: transformers builds its own causal (and sliding-window) mask from the
            # checkpoint's config, independently of kvplan's causal_mask.
            res = ref.step(embed(inp), None, torch.arange(last, last + n)[None], cache)
            hiddens.append(res.hidden[:, -1].float().numpy())
            token = int(head(res.hidden[:, -1]).argmax(-1))
            tokens.append(token)
            last += n
            inp = torch.tensor([[token]])
    return tokens, hiddens


def teacher_forced(cfg, dtype, embed, head, stack, prompt: torch.Tensor, ref_tokens: list[int], ref_hiddens: list,
                   tol) -> dict:
    """Drive ``stack`` on the reference's token prefix; top-1 agreement and hidden error per step.

    Teacher forcing makes every step's input known up front (the prompt, then the reference's
    tokens), so the stack may run them pack by pack (``run_steps``)."""
    # numpy has no bfloat16: a bf16 stack is fed torch tensors (Polygraphy takes both).
    host = (lambda t: t) if dtype == torch.bfloat16 else (lambda t: t.numpy())
    past = [host(torch.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), dtype=dtype))
            for _ in range(2 * cfg.num_layers)]
    steps, inp, last = [], prompt, 0
    with torch.no_grad():
        for want in ref_tokens:
            n = inp.shape[1]
            steps.append((host(embed(inp)), host(causal_mask(1, n, last, dtype, window=cfg.sliding_window)),
                          host(torch.arange(last, last + n)[None])))
            last += n
            inp = torch.tensor([[want]])              # teacher forcing: the reference's token
        hiddens = stack.run_steps(steps, past)
        agree, errors, exceeded = [], [], []
        for step, (hidden, want) in enumerate(zip(hiddens, ref_tokens)):
            h = hidden[:, -1]
            h = h if isinstance(h, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(h))
            logits = head(h.to(dtype))
            # argmax over NaN logits returns the NaN's index, which can equal the reference's
            # token: a stack producing NaN never agrees, and NaN is never within tolerance.
            finite = bool(torch.isfinite(logits).all())
            agree.append(finite and int(logits.argmax(-1)) == want)
            err = np.abs(as_float32(h) - ref_hiddens[step])
            errors.append(float(err.max()))
            exceeded.append(bool((~np.isfinite(err)).any() or (err > tol.atol + tol.rtol * np.abs(ref_hiddens[step])).any()))
    first_div = next((i for i, ok in enumerate(agree) if not ok), None)
    return {"steps": len(agree), "agreement": sum(agree) / len(agree), "first_divergence": first_div,
            "hidden_max_abs_per_step": errors, "drift": drift(errors),
            "first_step_over_tolerance": next((i for i, bad in enumerate(exceeded) if bad), None),
            "passed_tolerance": not any(exceeded)}


def drift(errors: list[float]) -> dict:
    """How the hidden_out error evolves over the steps (a growing error means the cache drifts)."""
    e = np.asarray(errors)
    head, tail = e[: max(1, len(e) // 4)], e[-max(1, len(e) // 4):]
    return {"first": float(e[0]), "last": float(e[-1]), "max": float(e.max()), "max_step": int(e.argmax()),
            "mean_first_quarter": float(head.mean()), "mean_last_quarter": float(tail.mean())}


def run_task_checks(source, dtype: torch.dtype, stacks: dict, steps: int, prompt: list[int], tol, log,
                    ends=None) -> dict:
    """Token agreement + multi-step drift for every runnable stack ({name: stack or why-not string}),
    from the token ids ``prompt`` (validation's: the start of the text the points are fed). ``ends``:
    the target's embedding and head graphs (kvplan.validate.perplexity.GraphEnds), which then embed
    the stacks' inputs and pick their tokens; else the checkpoint's own (transformers' modules)."""
    if source.read_lm is None:
        return {"ran": False, "why": f"{source.name}: the model source has no LM head (lm_head.weight)"}
    if all(isinstance(s, str) for s in stacks.values()):
        return {"ran": False, "why": "no decoder stack can run here (see the runners above)",
                "stacks": {n: {"ran": False, "why": s} for n, s in stacks.items()}}
    t0 = time.perf_counter()
    ref = HFReference(source, dtype, with_lm=True)
    prompt = torch.tensor([list(prompt)], dtype=torch.int64)
    ref_tokens, ref_hiddens = reference_greedy(ref, prompt, steps)
    # The stacks need only the embeddings and the LM head: the decoder's weights go before they run.
    cfg, embed, head = ref.source.config, ref.model.get_input_embeddings(), ref.model.lm_head
    if ends is not None:
        embed = lambda inp: torch.from_numpy(ends.embed(inp[0].tolist()))  # noqa: E731
        head = lambda h: ends.logits(h.numpy()[:, None])  # noqa: E731
    del ref
    release_memory()
    result = {"ran": True, "steps": steps, "prompt_tokens": prompt.shape[1], "mode": "teacher-forced greedy top-1",
              "ends": ends.names if ends is not None else "the checkpoint's embedding and LM head", "stacks": {}}
    for name, stack in stacks.items():
        if isinstance(stack, str):
            result["stacks"][name] = {"ran": False, "why": stack}
            continue
        log(f"[validate] task check: {steps} teacher-forced greedy steps through {name}")
        try:
            result["stacks"][name] = {"ran": True, **teacher_forced(cfg, dtype, embed, head, stack, prompt, ref_tokens,
                                                                    ref_hiddens, tol)}
        except ValueError as e:       # TensorRT: a step outside the engine's profiles
            result["stacks"][name] = {"ran": False, "why": str(e)}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result
