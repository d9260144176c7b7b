"""The whole step against transformers' own ``*ForCausalLM``: token ids -> embed.onnx -> the decoder's
graphs -> head.onnx (ONNX Runtime, the cache fed back as the target's kv_io mode wants), against the
model's logits for the same tokens, at each optimization profile's opt point (N = opt new tokens
after lastSum = opt, the prefix prefilled through the same graphs first).

The reference computes in float32 on the weights the graphs hold (an int4 target's dequantized
values, its int4 head's too), so what is measured is the graphs' arithmetic, not the quantization.
Pass: every logit within |got - ref| <= logits_atol + rtol * |ref| (the [validate] table's) and the
top-1 token equal at the share of positions validation asks for.
"""
from __future__ import annotations

import time

import numpy as np

from kvplan.embed_head.stage import end_graphs
from kvplan.lazy import lazy_import
from kvplan.pipeline import release_memory
from kvplan.quantize.rtn import quantize_linear
from kvplan.runtime.onnx import Graphs, OnnxModel
from kvplan.runtime.steps import chunk_size, positions
from kvplan.validate.reference import HFReference

torch = lazy_import("torch")


def _reference(source, profile, int4_group: int) -> HFReference:
    # Two forward passes, one per point: the layers are read as they run, so the float32 model is
    # never held whole (twice the fp16 weights, beside the embedding and head).
    ref = HFReference(source, torch.float32, with_lm=True, round_to=torch.float16 if profile.dtype == "float16"
                      else None, stream_layers=True)
    if int4_group:        # the head graph's own values
        w = ref.model.lm_head.weight.data
        ql = quantize_linear("lm_head.weight", w, int4_group)
        ref.model.lm_head.weight = torch.nn.Parameter(ql.dequantized(), requires_grad=False)
    return ref


def _hidden(model: OnnxModel, ids: list[int], last: int, n: int, chunk: int, capacity: int) -> np.ndarray:
    """hidden_out of the ``n`` tokens after ``last``, the prefix prefilled through the same graphs."""
    cache = model.new_cache(capacity)
    for start in range(0, last, chunk):
        model.decode(model.embed(np.array([ids[start:min(start + chunk, last)]])), cache)
    return model.decode(model.embed(np.array([ids[last:last + n]])), cache)


def _compare(got: dict, want: torch.Tensor, tol) -> dict:
    """``want``: the reference's logits [rows, vocab] for the rows the head returns."""
    if "logits" in got:
        logits = torch.from_numpy(got["logits"][0].astype(np.float32))
        d = (logits - want).abs()
        bound = tol.logits_atol + tol.rtol * want.abs()
        return {"rows": int(want.shape[0]), "max_abs": float(d.max()), "within": bool((d <= bound).all()),
                "top1": float((logits.argmax(-1) == want.argmax(-1)).float().mean())}
    ids, values = torch.from_numpy(got["top_ids"][0]), torch.from_numpy(got["top_values"][0].astype(np.float32))
    ref_values = want.gather(1, ids)
    d = (values - ref_values).abs()
    return {"rows": int(want.shape[0]), "max_abs": float(d.max()),
            "within": bool((d <= tol.logits_atol + tol.rtol * ref_values.abs()).all()),
            "top1": float((ids[:, 0] == want.argmax(-1)).float().mean())}


def whole_step(source, profile, target, manifest, packs, ids: list[int], log) -> dict:
    """The check's record: {"ran", "points": {label: figures}, "passed"} or {"ran": False, "why"}."""
    ends = end_graphs(manifest["stages"].get("embed_head"))
    if "embed" not in ends or "head" not in ends:
        return {"ran": False, "why": "no embed.onnx and head.onnx in this target (the model has no LM head)"}
    if profile.dtype == "bfloat16":
        return {"ran": False, "why": "ONNX Runtime's CPU provider runs no bfloat16 graphs"}
    t0 = time.perf_counter()
    capacity = positions(source, profile)
    points, runs = {}, []
    # The graphs' logits first, then the reference's: ONNX Runtime's sessions and transformers'
    # float32 model are never held together. A few runs only, so the casts are not folded: the
    # sessions hold the weights once, not as float32 copies (kvplan.runtime.ort_session).
    model = OnnxModel(Graphs([(p.spec, p.path) for p in packs], target / ends["embed"]["path"],
                             target / ends["head"]["path"]), source.config, profile.dtype, fold_casts=False)
    for sp in profile.shapes:
        last, n = sp.lastSum.opt, sp.N.opt
        if last + n > len(ids):
            points[sp.name] = {"ran": False, "why": f"{last + n} tokens needed, {len(ids)} at hand"}
            continue
        runs.append((f"{sp.name} N={n} lastSum={last}", sp.name, last, n,
                     _hidden(model, ids, last, n, chunk_size(profile), capacity)))
    # The head last, alone: its float32 weight cast (twice the head's fp16 bytes) and the
    # vocabulary-wide logits never sit beside the decoder's and the embedding's weights.
    model.release("decoder", "embed")
    release_memory()
    runs = [(label, name, last, n, model.head(hidden)) for label, name, last, n, hidden in runs]
    del model
    release_memory()
    ref = _reference(source, profile, ends["head"].get("int4_group", 0)) if runs else None
    for label, name, last, n, got in runs:
        with torch.no_grad():
            logits = ref.model(input_ids=torch.tensor([ids[:last + n]])).logits[0, last:last + n].float()
        want = logits[-1:] if profile.head.last_only else logits
        points[label] = {"ran": True, **_compare(got, want, profile.validate)}
        log(f"[validate] whole step at {name} (N={n}, lastSum={last}): logits max |d| {points[label]['max_abs']:.4g}")
    del ref
    ran = [p for p in points.values() if p.get("ran")]
    return {"ran": bool(ran), "points": points, "seconds": round(time.perf_counter() - t0, 2),
            "why": "" if ran else "no point's tokens at hand"}


def verdict(record: dict, min_agreement: float) -> list[str]:
    """The whole-step check's failures, in words (none when it passed or did not run)."""
    bad = []
    for label, p in (record.get("points") or {}).items():
        if not p.get("ran"):
            continue
        if not p["within"]:
            bad.append(f"whole step at {label}: logits over tolerance (max |d| {p['max_abs']:.4g})")
        if p["top1"] < min_agreement:
            bad.append(f"whole step at {label}: top-1 agreement {100 * p['top1']:.1f}% < {100 * min_agreement:.0f}%")
    return bad


def summary(record: dict) -> list[str]:
    if not record.get("ran"):
        return [f"whole step (embed -> decoder -> head vs transformers' CausalLM): not run: {record.get('why')}"]
    lines = ["whole step (embed -> decoder -> head, ONNX Runtime) vs transformers' CausalLM logits:"]
    for label, p in record["points"].items():
        lines.append(f"  {label}: " + (f"{p['rows']} row(s), max |d| {p['max_abs']:.4g}, top-1 {100 * p['top1']:.1f}%, "
                                        f"{'within' if p['within'] else 'OVER'} tolerance" if p.get("ran")
                                        else f"not run: {p['why']}"))
    return lines
