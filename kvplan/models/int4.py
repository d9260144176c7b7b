"""An int4 linear as kvplan holds it: what the quantizers make and what int4 sources (an AutoAWQ/GPTQ
checkpoint, a GGUF file's blocks) read their weights as."""
from __future__ import annotations

from dataclasses import dataclass

from kvplan.lazy import lazy_import

torch = lazy_import("torch")


@dataclass
class QuantLinear:
    """One linear, exactly: W^T[k, n] = q[k, n] * scale[k // G, n] + correction[k // G, n].

    ``q`` int8 holding int4 values in [-8, 7]; ``scale`` float32. ``correction`` (imported
    asymmetric checkpoints only) is ((8 - z) * s) per group, the part of a non-zero zero point
    that does not fit TensorRT's symmetric int4 (kvplan.quantize.graph adds it as a
    per-group sum of x times it). ``perm`` (GPTQ desc_act only): the graph's K rows are the
    input channels in this order, so x is gathered by it first.
    """
    q: torch.Tensor
    scale: torch.Tensor
    group_size: int
    correction: torch.Tensor | None = None
    perm: torch.Tensor | None = None

    def dequantized_t(self) -> torch.Tensor:
        """W^T [K, N] in float32, rows in the graph's order (``perm`` applied)."""
        g = self.group_size
        w = self.q.to(torch.float32) * self.scale.repeat_interleave(g, 0)
        if self.correction is not None:
            w = w + self.correction.repeat_interleave(g, 0)
        return w

    def dequantized(self) -> torch.Tensor:
        """The torch weight [out, in] (float32) that this int4 form computes."""
        w_t = self.dequantized_t()
        if self.perm is not None:
            w_t = torch.empty_like(w_t).index_copy_(0, self.perm, w_t)
        return w_t.t().contiguous()
