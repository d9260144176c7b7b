"""Round to nearest: symmetric per-group int4, scale = amax / 7, values in [-8, 7]."""
from __future__ import annotations

from kvplan.lazy import lazy_import
from kvplan.quantize.weights import INT4_MAX, INT4_MIN, QuantLinear, check_group

torch = lazy_import("torch")


def group_amax(w_t: torch.Tensor, group_size: int) -> torch.Tensor:
    """max |W^T| over each group of ``group_size`` input rows: [K/G, N]."""
    k, n = w_t.shape
    return w_t.abs().reshape(k // group_size, group_size, n).amax(dim=1)


def quantize_t(w_t: torch.Tensor, group_size: int, amax: torch.Tensor | None = None) -> QuantLinear:
    """Quantize W^T [K, N] (float32) per group of rows; ``amax`` (clipping) defaults to each group's own."""
    k, n = w_t.shape
    amax = group_amax(w_t, group_size) if amax is None else amax
    # An all-zero group gets scale 1 (its values are 0 either way) rather than a 0/0.
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))
    q = torch.round(w_t.reshape(k // group_size, group_size, n) / scale[:, None, :])
    q = q.clamp_(INT4_MIN, INT4_MAX).to(torch.int8).reshape(k, n)
    return QuantLinear(q, scale.to(torch.float32), group_size)


def fake_quantize_t(w_t: torch.Tensor, group_size: int, amax: torch.Tensor | None = None) -> torch.Tensor:
    """What ``quantize_t`` computes, as float W^T (the searches compare outputs with it)."""
    k, n = w_t.shape
    amax = group_amax(w_t, group_size) if amax is None else amax
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax))[:, None, :]
    q = torch.round(w_t.reshape(k // group_size, group_size, n) / scale).clamp_(INT4_MIN, INT4_MAX)
    return (q * scale).reshape(k, n)


def fake_quantize_rows(w: torch.Tensor, group_size: int, amax: torch.Tensor | None = None,
                       error: bool = False) -> torch.Tensor:
    """``fake_quantize_t`` in the torch layout: W [N, K] with each row's groups contiguous (no
    transposed copy: the searches call it dozens of times per weight). ``amax`` is [N, K/G].
    ``error``: return Q(W) - W instead (what the searches need), computed in the same buffer."""
    n, k = w.shape
    grouped = w.reshape(n, k // group_size, group_size)
    if amax is None:
        # amax and amin, no |W| copy (torch.aminmax over a last dim of 32..128 measured 8x slower).
        amax = torch.maximum(grouped.amax(-1), grouped.amin(-1).neg_())
    scale = torch.where(amax > 0, amax / INT4_MAX, torch.ones_like(amax)).unsqueeze(-1)
    out = (grouped / scale).round_().clamp_(INT4_MIN, INT4_MAX).mul_(scale)
    if error:
        out.sub_(grouped)
    return out.reshape(n, k)


def quantize_linear(name: str, weight: torch.Tensor, group_size: int) -> QuantLinear:
    """A torch weight [out, in] to its int4 form (graph layout, see kvplan.quantize.weights)."""
    check_group(name, weight.shape[1], group_size)
    return quantize_t(weight.to(torch.float32).t().contiguous(), group_size)
