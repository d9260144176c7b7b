"""The in-place cache write of ``kv_io = "inplace"``: a torch op for the decoder, and its ONNX form.

ONNX spells "write these N rows into the cache buffer at row ``write_indices[b]``" as
TensorScatter (opset 24), which TensorRT's parser maps to its KV-cache update layer:
the output shares the cache input's memory, so a step writes N rows per layer and
copies nothing else. torch has no such op, so the decoder calls ``kv_write``, a
custom op with an eager implementation (the reference semantics) and a translation
for the exporter.

The exporter emits opset 23 and cannot place an opset-24 op in that graph, so the
translation writes the node in a private domain with TensorScatter's own signature;
``adopt`` moves it into the default domain at opset 24 once the piece is traced.
"""
from __future__ import annotations

from onnxscript import values

from kvplan.lazy import lazy_import

onnx = lazy_import("onnx")
ir = lazy_import("onnx_ir")
torch = lazy_import("torch")

OPSET = 24                    # TensorScatter's first version
PENDING_DOMAIN = "kvplan.pending"


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


def _pending_schema() -> onnx.defs.OpSchema:
    real = onnx.defs.get_schema("TensorScatter", OPSET)
    param = onnx.defs.OpSchema.FormalParameter
    return onnx.defs.OpSchema(
        "TensorScatter", PENDING_DOMAIN, 1,
        inputs=[param(p.name, p.type_str, param_option=p.option) for p in real.inputs],
        outputs=[param(p.name, p.type_str) for p in real.outputs],
        type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in real.type_constraints],
        attributes=[onnx.defs.OpSchema.Attribute(a.name, a.type, a.description) for a in real.attributes.values()])


_TENSOR_SCATTER = values.Op(values.Opset(PENDING_DOMAIN, 1), "TensorScatter", _pending_schema())


def _kv_write_onnx(cache, update, write_indices, axis: int):
    return _TENSOR_SCATTER(cache, update, write_indices, axis=axis, mode="linear")


TRANSLATIONS = {torch.ops.kvplan.kv_write.default: _kv_write_onnx}


def adopt(model: ir.Model) -> bool:
    """Move pending TensorScatter nodes into the default domain (raising the model to opset 24).

    Opset 24 changed no op this exporter emits except by adding element types, so the
    rest of the graph means the same. Returns whether there was anything to move.
    """
    nodes = [n for n in model.graph if n.domain == PENDING_DOMAIN]
    for node in nodes:
        node.domain, node.version = "", None
    model.opset_imports.pop(PENDING_DOMAIN, None)
    model.graph.opset_imports.pop(PENDING_DOMAIN, None)
    if nodes:
        model.opset_imports[""] = max(model.opset_imports.get("", 0), OPSET)
    return bool(nodes)
