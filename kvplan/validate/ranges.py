"""Layer ranges of one graph, for validation that holds one range of layers at a time.

Validation (``--layer-ranges``, by default ranges of about 64 MiB of weights) cuts a single-pack
graph (the exported one, the fused one) into contiguous ranges of layers, each a graph of its
own with the pack contract of those layers (``hidden_in`` -> ``hidden_out`` and the range's
cache). Every runner runs the ranges in turn, each fed the runner's own ``hidden_out`` of the
range before, so together they compute what the whole graph does, with one range's weights in
memory at a time.

A range is cut at the tensor that leaves its last layer: the one tensor computed from
``hidden_in`` that a ``layers.{i}/`` node produces and a ``layers.{i+1}/`` node reads (the
stitched exporter names every node after its layer, and the surgery passes keep the names);
tensors a layer computes from the other inputs alone (a size read off ``attention_mask``) are
recomputed inside the range. Nothing of the graph is re-derived: the range's nodes are the
original nodes that its outputs depend on, back to the range's inputs, and its weights are the
original initializers they read, copied from the source file one at a time.
"""
from __future__ import annotations

import math
from pathlib import Path

from onnx.external_data_helper import load_external_data_for_tensor, uses_external_data

from kvplan.errors import GraphError
from kvplan.export.exporter import input_names, output_names
from kvplan.fileio import atomic_directory, atomic_file, write_streamed
from kvplan.lazy import lazy_import
from kvplan.quantize.lazy_onnx import read_entry, read_skeleton
from kvplan.stack import StackSpec

onnx = lazy_import("onnx")

# Above this many bytes of weights a range's file keeps them in an external data file
# (protobuf refuses messages over 2 GiB).
EMBED_LIMIT = 1 << 30


def range_specs(pack: StackSpec, count: int) -> list[StackSpec]:
    """``pack``'s layers in ``count`` contiguous ranges as even as they can be (the first ones
    one layer longer); only the last keeps the final norm."""
    layers = pack.last_layer - pack.first_layer
    if not 1 <= count <= layers:
        raise ValueError(f"--layer-ranges must be between 1 and the number of layers ({layers}), got {count}")
    size, extra = divmod(layers, count)
    specs, start = [], pack.first_layer
    for r in range(count):
        stop = start + size + (r < extra)
        specs.append(StackSpec(start, stop, pack.final_norm and stop == pack.last_layer,
                               pack.kv_format, pack.kv_io, pack.cache_len))
        start = stop
    return specs


def range_stem(stem: str, spec: StackSpec) -> str:
    return f"{stem}.layers{spec.first_layer}-{spec.last_layer - 1}"


def boundary(graph: onnx.GraphProto, layer: int, path: Path, carried: set[str] | None = None) -> str:
    """The tensor leaving ``layer`` for ``layer + 1``: of those a ``layers.{layer}/`` node produces and a
    ``layers.{layer + 1}/`` node reads, the one computed from ``hidden_in``. The others are computed
    from the other graph inputs alone (a shape read off ``attention_mask``, shared by every layer)
    and are recomputed inside the range: ``extract`` takes their nodes along."""
    produced = {out: n.name for n in graph.node if n.name.startswith(f"layers.{layer}/") for out in n.output}
    crossing = sorted({i for n in graph.node if n.name.startswith(f"layers.{layer + 1}/") for i in n.input
                       if i in produced})
    carried = _from_hidden(graph) if carried is None else carried
    found = [t for t in crossing if t in carried]
    if len(found) != 1:
        raise GraphError(f"{path}: cannot cut after layer {layer}: layer {layer + 1} reads "
                         f"{len(found)} tensors of layer {layer} computed from hidden_in "
                         f"({', '.join(found) or 'none'}), not one")
    return found[0]


def _from_hidden(graph: onnx.GraphProto) -> set[str]:
    """Every tensor computed (at any remove) from ``hidden_in`` (the nodes are in topological order)."""
    derived = {"hidden_in"}
    for node in graph.node:
        if any(i in derived for i in node.input):
            derived.update(node.output)
    return derived


def extract(model: onnx.ModelProto, spec: StackSpec, num_layers: int, path: Path, base_dir: Path,
            carried: set[str] | None = None) -> onnx.ModelProto:
    """The range ``spec`` of ``model`` (a single-pack graph of ``num_layers`` layers, read from
    ``path`` without its external data) as a graph with the pack contract of ``spec``; its
    initializers are as in ``model`` (values in an external data file stay there). ``carried``:
    ``_from_hidden(model.graph)``, when the caller cuts several ranges of one graph."""
    graph = model.graph
    carried = _from_hidden(graph) if carried is None else carried
    entry = "hidden_in" if spec.first_layer == 0 else boundary(graph, spec.first_layer - 1, path, carried)
    leave = "hidden_out" if spec.last_layer == num_layers else boundary(graph, spec.last_layer - 1, path, carried)
    rename = {entry: "hidden_in", leave: "hidden_out"}
    ins, outs = input_names(spec), output_names(spec)
    sources = {entry, *ins[1:]}
    needed = {leave, *outs[1:]}
    kept = []
    for node in reversed(graph.node):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i and i not in sources)
    kept.reverse()
    produced = {o for n in kept for o in n.output}
    initializers = [t for t in graph.initializer if t.name in needed]
    known = produced | sources | {t.name for t in initializers}
    stray = sorted(needed - known)
    if stray:
        raise GraphError(f"{path}: layers {spec.first_layer}..{spec.last_layer - 1} read {stray[0]}, "
                         f"which comes from outside the range")
    nodes = []
    for node in kept:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        node.input[:] = [rename.get(i, i) for i in node.input]
        node.output[:] = [rename.get(o, o) for o in node.output]
        nodes.append(node)
    by_name = {v.name: v for v in list(graph.input) + list(graph.output)}
    inputs = [by_name[n] for n in ins]
    outputs = [by_name[n] for n in outs]
    sub = onnx.helper.make_graph(nodes, f"{graph.name}_layers{spec.first_layer}_{spec.last_layer - 1}",
                                 inputs, outputs, initializers)
    return onnx.helper.make_model(sub, opset_imports=list(model.opset_import), ir_version=model.ir_version,
                                  producer_name=model.producer_name, functions=list(model.functions))


def _copy(t: onnx.TensorProto) -> onnx.TensorProto:
    out = onnx.TensorProto()
    out.CopyFrom(t)
    return out


def _inline(t: onnx.TensorProto, base_dir: Path) -> onnx.TensorProto:
    """A copy of ``t`` holding its values (read from its external data file, if it names one)."""
    t = _copy(t)
    if uses_external_data(t):
        load_external_data_for_tensor(t, str(base_dir))
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    return t


def write_ranges(source: Path, specs: list[StackSpec], num_layers: int, directory: Path, stem: str) -> list[Path]:
    """Each range of the graph at ``source`` as ``directory/<stem>.layers<a>-<b>.onnx``.

    The source's large weights are never parsed: the graph is read with skeletons in their place
    (kvplan/quantize/lazy_onnx.py), and each range's weights are copied from the source file
    entry by entry as its file is written, so memory holds one weight at a time.
    """
    try:
        model, lazy = read_skeleton(source)
    except Exception as e:
        raise GraphError(f"{source}: cannot read the graph to cut it into layer ranges: {e}") from e
    carried = _from_hidden(model.graph)

    def value(t: onnx.TensorProto) -> onnx.TensorProto:
        """``t`` with its values: its entry in the source file, or its external data read in."""
        return read_entry(source, *lazy[t.name][:2]) if t.name in lazy else _inline(t, source.parent)

    paths = []
    for spec in specs:
        sub = extract(model, spec, num_layers, source, source.parent, carried)
        path = directory / f"{range_stem(stem, spec)}.onnx"
        weights = sum(math.prod(t.dims) * _itemsize(t.data_type) for t in sub.graph.initializer)
        if weights > EMBED_LIMIT:
            # A range too big for one protobuf message: its weights go to a data file of its own.
            full = [value(t) for t in sub.graph.initializer]
            del sub.graph.initializer[:]
            sub.graph.initializer.extend(full)
            del full
            with atomic_directory(path, companions=(f"{path.name}.data",)) as tmp:
                onnx.save(sub, str(tmp / path.name), save_as_external_data=True, location=f"{path.name}.data")
        else:
            # Small entries as they are; weights (large inline entries, or external data) read one at a
            # time as the file is written.
            streamed = [_copy(t) for t in sub.graph.initializer if t.name in lazy or uses_external_data(t)]
            kept = [_copy(t) for t in sub.graph.initializer if not (t.name in lazy or uses_external_data(t))]
            del sub.graph.initializer[:]
            sub.graph.initializer.extend(kept)
            with atomic_file(path) as f:
                write_streamed(sub, lambda todo=streamed: (value(t) for t in todo), f)
        paths.append(path)
        del sub
    return paths


def _itemsize(data_type: int) -> int:
    return onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize
