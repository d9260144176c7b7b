"""The in-place cache write of ``kv_io = "inplace"`` as a torch op, for kvplan's torch decoder.

ONNX spells "write these N rows into the cache buffer at row ``write_indices[b]``" as
TensorScatter (opset 24), which TensorRT's parser maps to its KV-cache update layer: the
output shares the cache input's memory, so a step writes N rows per layer and copies nothing
else. The exported graph writes that node directly (kvplan/export/emit.py); torch has no such
op, so the torch decoder (the PyTorch side of validation) calls this one: its eager
implementation is the reference semantics.
"""
from __future__ import annotations

from kvplan.lazy import lazy_import

torch = lazy_import("torch")


@torch.library.custom_op("kvplan::kv_write", mutates_args=())
def kv_write(cache: torch.Tensor, update: torch.Tensor, write_indices: torch.Tensor, axis: int) -> torch.Tensor:
    """``cache`` with ``update`` written along ``axis`` from row ``write_indices[b]`` of batch row b."""
    out = cache.clone()
    n = update.shape[axis]
    for b in range(cache.shape[0]):
        start = int(write_indices[b])
        if start < 0 or start + n > cache.shape[axis]:
            raise IndexError(f"kv_write: rows {start}..{start + n - 1} do not fit a cache of {cache.shape[axis]} rows")
        out[b].narrow(axis - 1, start, n).copy_(update[b])
    return out


@kv_write.register_fake
def _(cache, update, write_indices, axis):
    return torch.empty_like(cache)
