"""Rewrite an exported graph's linears into the int4 form TensorRT-RTX and ONNX Runtime share.

    x @ W^T   ->   MatMul(x, DequantizeLinear(q INT4 [K, N], scale [K/G, N], axis=0, block_size=G))

no zero-point input, no ``output_dtype``, nothing between the DequantizeLinear and the MatMul
(TensorRT-RTX fuses exactly this into one int4 layer and keeps the weights int4 in the plan;
it refuses non-zero zero points and UINT4). The scale has the graph's float dtype.

Two additions, both on the activation side so the DQ -> MatMul pair stays untouched:
- an asymmetric checkpoint's zero points (QuantLinear.correction = (8 - z) * s per group)
  add ``ReduceSum(x per group of G) @ correction``; with q - 8 stored as INT4 this is
  W^T = (q - z) * s exactly, with no zero point clamped.
- GPTQ desc_act (QuantLinear.perm): ``Gather(x, perm, axis=-1)`` puts x's channels in the
  order of the weight's rows.

The linears are found by structure: the exporter marks each linear's MatMul with the name of the
weight it computes (kvplan.export.emit.LINEAR_MARK), and the marked MatMul's initializer is
checked to hold that weight's W^T byte for byte (the quantize stage reads the same source tensors
the export bound). Which layers a graph holds comes from the export's record, never from which
initializers survived deduplication.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from kvplan.errors import QuantizeError
from kvplan.export.emit import LINEAR_MARK
from kvplan.fileio import atomic_directory, ir_entry, write_streamed
from kvplan.lazy import lazy_import
from kvplan.quantize.lazy_onnx import load_lazy
from kvplan.quantize.weights import Quantized

ml_dtypes = lazy_import("ml_dtypes")
ir = lazy_import("onnx_ir")
torch = lazy_import("torch")

NP_DTYPES = {ir.DataType.FLOAT: np.float32, ir.DataType.FLOAT16: np.float16,
             ir.DataType.BFLOAT16: ml_dtypes.bfloat16}
# protobuf refuses messages over 2 GiB (as the exporter: above this, external data).
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def _to_np(t: torch.Tensor, dtype) -> np.ndarray:
    # Through torch's own dtype so the bytes are the export's (Tensor.to rounding).
    if dtype is ml_dtypes.bfloat16:
        return t.to(torch.bfloat16).view(torch.uint16).numpy().view(ml_dtypes.bfloat16)
    return t.to({np.float32: torch.float32, np.float16: torch.float16}[dtype]).numpy()


def _const(name: str, array: np.ndarray) -> ir.Value:
    tensor = ir.Tensor(array, name=name)
    return ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor)


def _int4_const(name: str, q: torch.Tensor) -> ir.Value:
    """``q`` (int8 holding int4 values) as an INT4 initializer made when it is written: numpy's
    int4 takes a byte per value, so making them all up front would hold a second copy of every
    linear's values."""
    shape = ir.Shape(list(q.shape))
    tensor = ir.LazyTensor(lambda: ir.Tensor(q.numpy().astype(ml_dtypes.int4), name=name), ir.DataType.INT4,
                           shape, name=name)
    return ir.Value(name=name, shape=shape, type=ir.TensorType(ir.DataType.INT4), const_value=tensor)


class _Rewriter:
    def __init__(self, model: ir.Model, path: Path):
        self.model, self.graph, self.path = model, model.graph, path
        # The exporter marks each linear's MatMul with its weight's name (kvplan.export.emit).
        self.linears: dict[str, ir.Node] = {}
        for node in self.graph:
            name = node.metadata_props.get(LINEAR_MARK)
            if name is None:
                continue
            if name in self.linears:
                raise QuantizeError(f"{path}: tensor {name!r}: two MatMul nodes ({self.linears[name].name}, "
                                    f"{node.name}) are marked as computing it")
            self.linears[name] = node

    def find(self, name: str, original_t: torch.Tensor) -> ir.Value:
        """The initializer of the MatMul marked as computing ``name``, checked to hold ``original_t``
        (the linear's W^T) in the graph's dtype, byte for byte."""
        node = self.linears.get(name)
        if node is None:
            raise QuantizeError(f"{self.path}: tensor {name!r}: no MatMul of the graph is marked as computing it "
                                f"(a graph from another exporter or an older kvplan; rebuild with --force)")
        value = node.inputs[1]
        if value is None or value.const_value is None or value.dtype not in NP_DTYPES:
            raise QuantizeError(f"{self.path}: tensor {name!r}: the weight input of {node.name} is not a float "
                                f"initializer")
        expected = _to_np(original_t, NP_DTYPES[value.dtype])
        got = value.const_value.numpy()
        if got.shape != expected.shape or got.tobytes() != expected.tobytes():
            raise QuantizeError(f"{self.path}: tensor {name!r}: initializer {value.name} of {node.name} does not hold "
                                f"the source's values of it (the graph was exported from other weights)")
        if len(value.uses()) != 1:
            raise QuantizeError(f"{self.path}: tensor {name!r}: initializer {value.name} feeds "
                                f"{len(value.uses())} nodes; a linear's weight must be its own")
        return value

    def linear(self, name: str, weight: ir.Value, ql) -> None:
        users = list(weight.uses())
        k, n = ql.q.shape
        if tuple(weight.shape) != (k, n):
            raise QuantizeError(f"{self.path}: tensor {name!r}: graph weight {list(weight.shape)} is not the "
                                f"quantized [{k}, {n}]")
        np_dtype = NP_DTYPES[weight.dtype]
        base = name.removesuffix(".weight")
        q = _int4_const(f"{base}.qweight", ql.q)
        scale = _const(f"{base}.scales", _to_np(ql.scale, np_dtype))
        for v in (q, scale):
            self.graph.register_initializer(v)
        for use in users:
            mm = use.node
            dq = ir.node("DequantizeLinear", [q, scale], attributes={"axis": 0, "block_size": ql.group_size},
                         name=f"{mm.name}/dequantize")
            dq.outputs[0].name = f"{base}.dequantized"
            dq.outputs[0].dtype, dq.outputs[0].shape = weight.dtype, ir.Shape([k, n])
            extra = [dq]
            x = mm.inputs[0]
            if ql.perm is not None:
                perm = _const(f"{base}.perm", ql.perm.to(torch.int64).numpy())
                self.graph.register_initializer(perm)
                gather = ir.node("Gather", [x, perm], attributes={"axis": -1}, name=f"{mm.name}/permute")
                gather.outputs[0].name = f"{mm.name}/permuted"
                x = gather.outputs[0]
                mm.replace_input_with(0, x)
                extra.insert(0, gather)
            self.graph.insert_before(mm, extra)
            mm.replace_input_with(1, dq.outputs[0])
            if ql.correction is not None:
                self._correction(base, mm, x, ql, np_dtype)
        self.graph.initializers.pop(weight.name)

    def _correction(self, base: str, mm: ir.Node, x: ir.Value, ql, np_dtype) -> None:
        k, n = ql.q.shape
        groups = k // ql.group_size
        corr = _const(f"{base}.zero_correction", _to_np(ql.correction, np_dtype))
        shape = _const(f"{base}.group_shape", np.array([0, 0, groups, ql.group_size], dtype=np.int64))
        axes = _const(f"{base}.group_axes", np.array([-1], dtype=np.int64))
        for v in (corr, shape, axes):
            self.graph.register_initializer(v)
        reshape = ir.node("Reshape", [x, shape], name=f"{mm.name}/groups")
        summed = ir.node("ReduceSum", [reshape.outputs[0], axes], attributes={"keepdims": 0},
                         name=f"{mm.name}/group_sums")
        term = ir.node("MatMul", [summed.outputs[0], corr], name=f"{mm.name}/zero_point")
        out = mm.outputs[0]
        add = ir.node("Add", [out, term.outputs[0]], name=f"{mm.name}/with_zero_point")
        for node, suffix in ((reshape, "groups"), (summed, "group_sums"), (term, "zero_point"),
                             (add, "with_zero_point")):
            node.outputs[0].name = f"{mm.name}/{suffix}"
        for use in list(out.uses()):
            if use.node is not add:
                use.node.replace_input_with(use.idx, add.outputs[0])
        if out in self.graph.outputs:
            raise QuantizeError(f"{self.path}: {mm.name}: a graph output cannot take a zero-point correction")
        self.graph.insert_after(mm, [reshape, summed, term, add])

    def replace(self, name: str, original: torch.Tensor, new: torch.Tensor, linear: bool) -> None:
        if linear:
            value = self.find(name, original.t())
            value.const_value = ir.Tensor(_to_np(new.t().contiguous(), NP_DTYPES[value.dtype]), name=value.name)
            return
        value = self.graph.initializers.get(name)
        if value is None:
            raise QuantizeError(f"{self.path}: tensor {name!r}: no initializer of that name to replace")
        if tuple(value.shape) != tuple(new.shape):
            raise QuantizeError(f"{self.path}: tensor {name!r}: replacement {list(new.shape)} is not "
                                f"{list(value.shape)}")
        value.const_value = ir.Tensor(_to_np(new, NP_DTYPES[value.dtype]), name=name)


def quantize_graph(src: Path, dst: Path, quantized: Quantized, originals, layers: range) -> dict:
    """Write ``src`` (the export of ``layers``) with ``quantized``'s linears of those layers in int4
    form and its replaced tensors of them swapped in, to ``dst`` (atomically). ``originals(names)``
    reads the unquantized tensors the export bound.

    Every linear of ``layers`` that ``quantized`` holds must be in the graph and become int4, and
    the written graph must hold exactly that many int4 DequantizeLinear nodes: anything else is
    refused, never written as a partly int4 graph.

    Memory: ``src``'s large weights stay in the file and are read one at a time (see
    kvplan.quantize.lazy_onnx), the int4 initializers are made as they are written; what is
    held is ``quantized`` itself, one byte per weight."""
    model = load_lazy(src)
    rw = _Rewriter(model, src)
    names = [n for n in quantized.linears if _layer(n) in layers]
    outside = sorted(n for n in rw.linears if _layer(n) not in layers)
    if outside:
        raise QuantizeError(f"{src}: tensor {outside[0]!r}: the graph computes a linear of a layer outside its "
                            f"layers {layers.start}..{layers.stop - 1}")
    replaced = [n for n in quantized.replaced if _layer(n) in layers or (_layer(n) is None and n in
                                                                           model.graph.initializers)]
    # Locate every weight before changing anything: a failure leaves nothing half-rewritten.
    located = {}
    for name in names:
        (orig,) = originals([name]).values()
        located[name] = rw.find(name, orig.to(torch.float32).t().contiguous())
    originals_replaced = originals([n for n in replaced if n in rw.linears]) if replaced else {}
    for name in replaced:
        if name in originals_replaced:
            rw.replace(name, originals_replaced[name].to(torch.float32), quantized.replaced[name], linear=True)
        else:
            rw.replace(name, None, quantized.replaced[name], linear=False)
    for name in names:
        rw.linear(name, located[name], quantized.linears[name])
    int4 = sum(1 for node in model.graph if node.op_type == "DequantizeLinear"
               and node.inputs[0] is not None and node.inputs[0].dtype == ir.DataType.INT4)
    if int4 != len(names):
        raise QuantizeError(f"{src}: {int4} int4 DequantizeLinear nodes after the rewrite, {len(names)} expected "
                            f"(the linears of layers {layers.start}..{layers.stop - 1}); nothing was written")
    model.graph.sort()
    save(model, dst)
    return {"linears": len(names), "linears_in_graph": len(rw.linears), "replaced": len(replaced)}


def _layer(name: str) -> int | None:
    """The layer a tensor of the model belongs to (``layers.3.mlp.up_proj.weight`` -> 3), None for
    the final norm."""
    return int(name.split(".")[1]) if name.startswith("layers.") else None


def save(model: ir.Model, path: Path) -> None:
    """Write ``model`` to ``path`` atomically, weights serialized one at a time (external data when big)."""
    weights = list(model.graph.initializers.values())
    total = sum(v.const_value.nbytes for v in weights)
    with atomic_directory(path, companions=(path.name + ".data",)) as tmp:
        if total > EXTERNAL_DATA_THRESHOLD:
            ir.save(model, tmp / path.name, external_data=path.name + ".data")
        else:
            _save_streamed(model, tmp / path.name)


def _save_streamed(model: ir.Model, path: Path) -> None:
    """The exporter's streamed save (kvplan.fileio.write_streamed: one weight at a time), with
    weights still in the source file copied from it unparsed (kvplan.fileio.ir_entry)."""
    weights = list(model.graph.initializers.values())
    model.graph.initializers.clear()
    head = ir.serde.serialize_model(model)
    with open(path, "wb") as f:
        write_streamed(head, lambda: (ir_entry(value) for value in weights), f)
