"""AWQ (Lin et al. 2023, activation-aware weight quantization) on kvplan's own decoder layer.

Layer by layer, on cached layer inputs (never the whole model's activations at once):
1. The fp32 layer runs on the cached inputs; each linear's input is captured.
2. Per scaling group, per-input-channel scales s = mean|x|^alpha (normalised so
   max(s)·min(s) = 1) are searched over 20 alphas in [0, 1), minimising the output MSE of the
   group's quantized linears, W·diag(s) quantized and x/s fed to it. alpha = 0 is RTN, so the
   chosen scales never do worse than RTN on the calibration data. The groups are the paper's:
   input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, up -> down, and v -> o only
   without GQA (with GQA, v's rows do not map one to one onto o's input channels).
3. The scales are folded exactly: W·diag(s) into the group's linears, 1/s into the norm gain or
   the preceding linear's rows (and bias). In full precision the layer computes what it did.
4. Per-group clipping search: for each linear but q and k (whose errors the softmax amplifies,
   as AutoAWQ also leaves them), each group's amax shrunk by 0..45 % in 5 % steps, the one with the
   least output error of that group kept.
5. The next layer is calibrated on this layer's outputs with its weights quantized.

Cost per layer: 20 alpha trials and 10 clip trials, each about one matmul of the captured
tokens by every weight (searched a block of output rows at a time, one torch thread: see ROWS
and THREADS). Memory: one layer's fp32 copy, the calibration activations (and their
captures, a few times samples x tokens x intermediate floats), and the int4 results so far
(1 byte per weight, as int8).
"""
from __future__ import annotations

import time
from typing import Callable

from kvplan.decoder import DecoderLayer, RotaryCosSin
from kvplan.lazy import lazy_import
from kvplan.models.presets import tensor_shapes
from kvplan.quantize.calibration import calibration_hidden
from kvplan.quantize.calibration import resolve as resolve_calibration
from kvplan.quantize.calibration import warning as calibration_warning
from kvplan.quantize.linears import MODULES, check_groups, weight_name
from kvplan.quantize.rtn import fake_quantize_rows, quantize_t
from kvplan.quantize.settings import Quantize
from kvplan.quantize.weights import Quantized

torch = lazy_import("torch")

ALPHAS = [i / 20 for i in range(20)]
CLIP_RATIOS = [1 - i / 20 for i in range(10)]
NO_CLIP = ("q_proj", "k_proj")


def _module(layer: DecoderLayer, linear: str) -> torch.nn.Linear:
    part, name = MODULES[linear].split(".")
    return getattr(getattr(layer, part), name)


def scaling_groups(cfg, linears) -> list[tuple[str, list[str]]]:
    """(what the scales fold into, the linears sharing them), for the groups holding a quantized linear."""
    groups = [("input_layernorm", ["q_proj", "k_proj", "v_proj"])]
    if cfg.num_heads == cfg.num_kv_heads:
        groups.append(("v_proj", ["o_proj"]))
    # Gemma 2's sandwich norms: post_attention_layernorm normalizes the attention's output, and the
    # MLP's input is pre_feedforward_layernorm's (folding into the other would change the model).
    mlp_norm = "pre_feedforward_layernorm" if cfg.sandwich_norm else "post_attention_layernorm"
    groups += [(mlp_norm, ["gate_proj", "up_proj"]), ("up_proj", ["down_proj"])]
    return [(prev, group) for prev, group in groups if any(g in linears for g in group)]


def _capture(layer: DecoderLayer, x, mask, cos, sin, past) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The layer's output on ``x`` and every linear's input (flattened to [tokens, in])."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for linear in MODULES:
        def hook(_, args, linear=linear):
            seen[linear] = args[0].reshape(-1, args[0].shape[-1]).detach()
        hooks.append(_module(layer, linear).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            out, _, _ = layer(x, mask, cos, sin, *past)
    finally:
        for h in hooks:
            h.remove()
    return out, seen


# Output rows per step of the searches: a block of W and its trial copies stay in the CPU's cache
# through the half-dozen elementwise passes of a fake quantization instead of streaming a whole
# [3072, 768] weight through memory each time (profiled: 1.5-3x faster per trial on this machine).
ROWS = 256


def _trial_error(w: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """Q(W·diag(s)) - W·diag(s) for a block of rows of W, in one new buffer."""
    return fake_quantize_rows(w * s, group_size, error=True)


def search_scales(x: torch.Tensor, weights: list[torch.Tensor], quantized: list[bool],
                  group_size: int) -> tuple[torch.Tensor, list[float]]:
    """The per-input-channel scales of one group, and the loss per alpha (ALPHAS' order).

    The output error of a trial is (x / s) @ (Q(W·s) - W·s)^T: no reference product needed;
    its mean square is summed over blocks of output rows (see ROWS).
    """
    x_mean = x.abs().mean(0)
    best, best_loss, losses = None, float("inf"), []
    for alpha in ALPHAS:
        s = x_mean.pow(alpha).clamp(min=1e-4)
        s = s / (s.max() * s.min()).sqrt()
        xs = x / s
        loss = 0.0
        for w, q in zip(weights, quantized):
            if q:
                sq = sum(float(torch.mm(xs, _trial_error(block, s, group_size).t()).pow_(2).sum())
                         for block in w.split(ROWS))
                loss += sq / (x.shape[0] * w.shape[0])
        losses.append(loss)
        if loss < best_loss:
            best, best_loss = s, loss
    return best, losses


def search_clip(x: torch.Tensor, w: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per-group amax [K/G, N] of W^T minimising each group's own output error on ``x``.

    The error of group g on output n over all tokens is dW_g[n] H_g dW_g[n]^T with
    H_g = X_g^T X_g / tokens ([G, G] per group, computed once), so every calibration token
    counts at a cost of N x K x G per trial, independent of the number of tokens. Output rows
    are searched a block at a time (see ROWS); each row's choice is its own.
    """
    n, k = w.shape
    groups = k // group_size
    xg = x.reshape(-1, groups, group_size).transpose(0, 1)            # [K/G, tokens, G]
    gram = torch.bmm(xg.transpose(1, 2), xg) / x.shape[0]              # [K/G, G, G]
    out = []
    for block in w.split(ROWS):
        rows = block.shape[0]
        amax = block.reshape(rows, groups, group_size).abs().amax(-1)  # [rows, K/G]
        best_err = torch.full((groups, rows), float("inf"))
        best = amax.t().contiguous()
        for ratio in CLIP_RATIOS:
            trial = amax * ratio
            diff = fake_quantize_rows(block, group_size, trial, error=True)
            diff = diff.reshape(rows, groups, group_size).transpose(0, 1)
            err = (torch.bmm(diff, gram) * diff).sum(-1)                 # [K/G, rows]
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, trial.t(), best)
        out.append(best)
    return torch.cat(out, 1)                                          # [K/G, N], W^T's groups


def _fold(layer: DecoderLayer, prev: str, group: list[str], s: torch.Tensor) -> None:
    with torch.no_grad():
        for linear in group:
            _module(layer, linear).weight.mul_(s)
        if prev.endswith("layernorm"):
            getattr(layer, prev).weight.div_(s)
        else:
            m = _module(layer, prev)
            m.weight.div_(s[:, None])
            if m.bias is not None:
                m.bias.div_(s)


# Torch threads for the searches. One: they are hundreds of small matmuls and elementwise passes
# per layer, and on this shared 2-core machine two OpenMP threads waiting on a busy core made a
# layer 5-10x slower than one thread (measured with another build running); quiet, two gain
# little on blocks this small.
THREADS = 1


def quantize_awq(source, settings: Quantize, log: Callable[[str], None] = print) -> Quantized:
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        return _quantize_awq(source, settings, log)
    finally:
        torch.set_num_threads(threads)


def _quantize_awq(source, settings: Quantize, log: Callable[[str], None]) -> Quantized:
    cfg = source.config
    check_groups(cfg, settings.linears, settings.group_size, source.name)
    g = settings.group_size
    calibration = resolve_calibration(settings.calibration, source)
    log(f"[quantize] awq: {cfg.num_layers} layers, calibration {settings.samples} x {settings.tokens} tokens "
        f"({calibration.label}{', ' + calibration.why if calibration.why else ''}), group {g}")
    note = calibration_warning(calibration, source)
    if note:
        log(note)
    x = calibration_hidden(source, settings, log)
    samples, tokens = x.shape[:2]
    pos = torch.arange(tokens).expand(samples, tokens)
    cos, sin = RotaryCosSin(cfg, torch.float32)(pos)
    mask = torch.full((tokens, tokens), torch.finfo(torch.float32).min).triu(1).expand(samples, 1, tokens, tokens)
    past = [torch.zeros(samples, cfg.num_kv_heads, 0, cfg.head_dim)] * 2
    groups = scaling_groups(cfg, settings.linears)
    out = Quantized(record={"method": "awq", "group_size": g, "linears": list(settings.linears),
                            "calibration": {"source": calibration.label, "setting": settings.calibration,
                                            "samples": samples, "tokens": tokens,
                                            "seed": settings.seed}, "alpha": {}, "clip": settings.clip})
    t0 = time.perf_counter()
    for i in range(cfg.num_layers):
        spent = {"forward": 0.0, "scales": 0.0, "clip": 0.0}
        tic = time.perf_counter()
        prefix = f"layers.{i}."
        with torch.device("meta"):
            layer = DecoderLayer(cfg)
        weights = {n.removeprefix(prefix): t.to(torch.float32)
                   for n, t in source.read_tensors(_layer_names(cfg, i)).items()}
        layer.load_state_dict(weights, assign=True)
        layer.eval()
        # Copies of what folding may change and quantization does not replace (not the linears
        # being quantized: that would be a second fp32 copy of the layer).
        quantized = {weight_name(i, linear) for linear in settings.linears}
        before = {n: t.clone() for n, t in weights.items() if _foldable(n) and prefix + n not in quantized}
        del weights
        _, seen = _capture(layer, x, mask, cos, sin, past)
        tic = _lap(spent, "forward", tic)
        alphas = {}
        for prev, group in groups:
            ws = [_module(layer, m).weight.detach() for m in group]
            s, losses = search_scales(seen[group[0]], ws, [m in settings.linears for m in group], g)
            alphas[prev] = ALPHAS[losses.index(min(losses))]
            _fold(layer, prev, group, s)
        out.record["alpha"][str(i)] = alphas
        tic = _lap(spent, "scales", tic)
        # Inputs as the scaled layer sees them (x / s), for the clipping search.
        _, seen = _capture(layer, x, mask, cos, sin, past)
        tic = _lap(spent, "forward", tic)
        with torch.no_grad():
            for linear in settings.linears:
                m = _module(layer, linear)
                w = m.weight.detach()
                amax = search_clip(seen[linear], w, g) if settings.clip and linear not in NO_CLIP else None
                ql = quantize_t(w.t().contiguous(), g, amax)
                out.linears[weight_name(i, linear)] = ql
                m.weight.copy_(ql.dequantized())
        del seen
        state = layer.state_dict()
        for name, t in before.items():
            if not torch.equal(state[name], t):
                out.replaced[prefix + name] = state[name].clone()
        tic = _lap(spent, "clip", tic)
        x, _ = _capture(layer, x, mask, cos, sin, past)
        _lap(spent, "forward", tic)
        log(f"[quantize] awq: layer {i + 1}/{cfg.num_layers} (alpha {', '.join(f'{k} {v:.2f}' for k, v in alphas.items())}; "
            f"scales {spent['scales']:.1f} s, clip {spent['clip']:.1f} s, forward {spent['forward']:.1f} s) "
            f"{time.perf_counter() - t0:.1f} s")
        del layer, state
    return out


def _lap(spent: dict, phase: str, tic: float) -> float:
    now = time.perf_counter()
    spent[phase] += now - tic
    return now


def _layer_names(cfg, i: int) -> list[str]:
    return [n for n in tensor_shapes(cfg) if n.startswith(f"layers.{i}.")]


def _foldable(name: str) -> bool:
    """Tensors scale folding may change: norm gains, the linears and their biases."""
    return name.endswith("layernorm.weight") or "_proj." in name
