"""Trace once, stitch many: build a pack's ONNX graph from three small traced pieces.

Every decoder layer is the same computation with different weights, so tracing
the whole stack with torch.export costs time proportional to depth (about 2.5 s
a layer for the default model) for no new information. Instead we trace three
pieces once: the rotary cos/sin of the step's positions, one decoder layer, and
the final norm. The pack graph is then assembled from copies of the layer
piece, each wired to its own cache tensors and bound to its own weights by
name. The result is the graph a whole-stack trace gives, node for node, in a
time that does not grow with depth.
"""
from __future__ import annotations

import warnings
from typing import Callable

import onnx_ir.passes.common as common_passes
import onnxscript.optimizer

from kvplan import kv_write
from kvplan.config import DecoderConfig
from kvplan.decoder import DecoderLayer, LayerStep, RMSNorm, RotaryCosSin, StackSpec
from kvplan.export.trace_cache import Piece, TraceCache
from kvplan.lazy import lazy_import

ml_dtypes = lazy_import("ml_dtypes")
ir = lazy_import("onnx_ir")
torch = lazy_import("torch")

OPSET = 23
# Stack traces and FX dumps name this checkout's paths, the namespace and class hierarchy
# kvplan's Python module layout; the module scope (pkg.torch.onnx.name_scopes) stays.
DROPPED_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.fx_node", "namespace",
                    "pkg.torch.onnx.class_hierarchy")


def trace(module: torch.nn.Module, args: tuple, dynamic_shapes, names: tuple[list[str], list[str]]) -> ir.Model:
    """One torch.onnx.export call; returns the model with its weights lifted to graph inputs and
    the exporter's pattern rewrites applied."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, f=None, dynamo=True, opset_version=OPSET,
                                    input_names=names[0], output_names=names[1],
                                    dynamic_shapes=dynamic_shapes, optimize=False, verbose=False,
                                    custom_translation_table=kv_write.TRANSLATIONS)
    model = program.model
    kv_write.adopt(model)
    graph = model.graph
    # Lift initializers to graph inputs so each copy can be bound to other tensors.
    for name in list(graph.initializers):
        value = graph.initializers.pop(name)
        value.meta["weight"] = value.const_value
        value.const_value = None
        graph.inputs.append(value)
    # Optimized here, once and with the weights as inputs (so nothing derived from this
    # copy's weights is folded in): the optimizer's pattern rewrites cost seconds per layer
    # on a whole stack, and only the pieces need them.
    onnxscript.optimizer.optimize_ir(model)
    return model


class _SideBySide(torch.nn.Module):
    """Several pieces in one module, so that one export call traces them all.

    Each call of the exporter costs seconds of fixed work (building its operator registry,
    decompositions) whatever the size of the module; the pieces are independent
    computations, so the traced graph is their disjoint union and ``split`` takes it apart.
    """

    def __init__(self, parts: dict[str, torch.nn.Module], arity: dict[str, int]):
        super().__init__()
        self.parts = torch.nn.ModuleDict(parts)
        self.arity = arity

    def forward(self, *args):
        outputs, i = [], 0
        for name, part in self.parts.items():
            result = part(*args[i:i + self.arity[name]])
            i += self.arity[name]
            outputs += list(result) if isinstance(result, tuple) else [result]
        return tuple(outputs)


def split(model: ir.Model, proto, piece: str, inputs: list[str], outputs: list[str]) -> Piece:
    """The piece of a side-by-side trace that computes ``outputs`` from ``inputs``, with its weights
    (the graph inputs named ``parts.<piece>.*``) after them under their names within the piece.
    ``proto`` is ``model`` serialized (once for all pieces); each piece is cut from its own copy,
    since deserialized tensors keep pointing into the proto they came from."""
    private = type(proto)()
    private.CopyFrom(proto)
    copy = ir.serde.deserialize_model(private)
    graph = copy.graph
    kept = [v for v in graph.outputs if v.name in outputs]
    graph.outputs.clear()
    graph.outputs.extend(kept)
    common_passes.RemoveUnusedNodesPass()(copy)
    prefix = f"parts.{piece}."
    by_name = {v.name: v for v in graph.inputs}
    original = {v.name: v for v in model.graph.inputs}
    data = [by_name[n] for n in inputs]
    weights = [v for v in graph.inputs if v.name.startswith(prefix) and v.uses()]
    graph.inputs.clear()
    graph.inputs.extend(data + weights)
    # The tracer may take a size from any input with the same value: a node of this piece
    # reading another piece's input would leave the copy dangling.
    known = set(graph.inputs) | set(graph.initializers.values())
    for node in graph:
        known.update(node.outputs)
        strays = [v.name for v in node.inputs if v is not None and v not in known]
        if strays:
            raise RuntimeError(f"traced piece {piece!r}: node {node.name} reads {strays}, not an input of the piece")
    values = {}
    for v in weights:
        values[v.name[len(prefix):]] = original[v.name].meta["weight"]
        v.name = v.name[len(prefix):]
    proto = ir.serde.serialize_graph(graph)
    return Piece(proto, list(values), values, dict(copy.functions), dict(copy.opset_imports))


class Stitcher:
    """Assembles one graph from copies of pieces."""

    def __init__(self, inputs: list[ir.Value]):
        self.graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": OPSET}, name="kvplan_decoder")
        self.functions: dict = {}
        self._weights: dict[int, ir.Value] = {}
        # The names of the model's own tensors bound into the graph (``layers.3.mlp.up_proj.weight``).
        self.weight_names: set[str] = set()

    def initializer(self, name: str, tensor: ir.Tensor) -> ir.Value:
        # One initializer per tensor object: pieces copied several times with the
        # same weights (the shared rotary) do not duplicate them.
        key = id(tensor)
        if key not in self._weights:
            value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                             const_value=tensor)
            self.graph.register_initializer(value)
            self._weights[key] = value
            self.weight_names.add(name)
        return self._weights[key]

    def add(self, piece: Piece, prefix: str, inputs: list[ir.Value],
            bind: Callable[[str], tuple[str, ir.Tensor]] | None = None) -> list[ir.Value]:
        """Copy ``piece`` in, wired to ``inputs``; returns the copy's outputs.

        ``bind(weight_name)`` gives the initializer name and tensor of each of the
        piece's weights in this copy; without it the traced values are used.
        """
        # A private copy of the (weightless) proto: deserialized tensors keep pointing into
        # it, and renaming them below must not rename the next copy's.
        proto = type(piece.graph_proto)()
        proto.CopyFrom(piece.graph_proto)
        graph = ir.serde.deserialize_graph(proto)
        n_data = len(graph.inputs) - len(piece.weight_names)
        if n_data != len(inputs):
            raise ValueError(f"piece {prefix!r} takes {n_data} inputs, got {len(inputs)}")
        bound = list(inputs)
        for name in piece.weight_names:
            full_name, tensor = bind(name) if bind else (name, piece.weights[name])
            bound.append(self.initializer(full_name, tensor))
        for inner, outer in zip(list(graph.inputs), bound):
            inner.replace_all_uses_with(outer)
        # Constants the piece's optimizer lifted to initializers travel with each copy
        # (identical ones are merged when the stitched graph is finished).
        for name in list(graph.initializers):
            value = graph.initializers.pop(name)
            value.name = prefix + name
            self.graph.register_initializer(value)
        outputs = list(graph.outputs)
        graph.outputs.clear()
        nodes = list(graph)
        for node in nodes:
            graph.remove(node, safe=False)
        for node in nodes:
            node.name = prefix + (node.name or node.op_type)
            # Dropped so the same model exports to the same bytes from any directory and
            # whatever kvplan's modules are called (DROPPED_METADATA).
            for key in DROPPED_METADATA:
                node.metadata_props.pop(key, None)
            for out in node.outputs:
                out.name = prefix + out.name
                # Shapes carry the tracer's private symbols; shape inference redoes them
                # in terms of the graph's N / lastSum / sumN.
                if out.shape is not None and any(isinstance(d, ir.SymbolicDim) for d in out.shape):
                    out.shape = None
            self.graph.append(node)
        self.functions.update(piece.functions)
        # A piece with TensorScatter (kv_io = "inplace") raises the whole graph to opset 24.
        self.graph.opset_imports[""] = max(self.graph.opset_imports[""], piece.opsets.get("", OPSET))
        return outputs

    def model(self, outputs: dict[str, ir.Value]) -> ir.Model:
        for name, value in outputs.items():
            value.name = name
            self.graph.outputs.append(value)
        model = ir.Model(self.graph, ir_version=10, producer_name="kvplan", functions=list(self.functions.values()))
        for fn in self.functions.values():
            for domain, version in fn.opset_imports.items():
                self.graph.opset_imports.setdefault(domain, version)
        return model


def torch_to_ir(t: torch.Tensor, name: str) -> ir.Tensor:
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return ir.Tensor(t.view(torch.uint16).numpy().view(ml_dtypes.bfloat16), name=name)
    return ir.Tensor(t.numpy(), name=name)


# Traced pieces depend on the architecture, dtype, batch and cache layout, never on
# the weights (every copy is bound to its own), so one process traces them once per such
# key: packs of one export, and repeated exports (tests, benchmarks), reuse them.
_PIECES: dict[tuple, dict[str, Piece]] = {}
# Rows a dynamic batch axis is traced at: torch.export specialises sizes 0 and 1.
TRACE_BATCH = 2


def _trace_together(made: dict[str, tuple]) -> dict[str, Piece]:
    """Trace the pieces side by side in one module and split the graph into one Piece each.
    ``made``: name -> (module, example args, dynamic axes, input names, output names)."""
    module = _SideBySide({name: m for name, (m, *_) in made.items()},
                         {name: len(args) for name, (_, args, *_) in made.items()})
    names = {name: ([f"piece_in_{name}_{i}" for i in ins], [f"piece_out_{name}_{o}" for o in outs])
             for name, (_, _, _, ins, outs) in made.items()}
    model = trace(module, tuple(a for _, args, *_ in made.values() for a in args),
                  # forward(*args): one argument, the tuple of every piece's inputs
                  (tuple(d for _, _, dims, *_ in made.values() for d in dims),),
                  ([n for ins, _ in names.values() for n in ins], [n for _, outs in names.values() for n in outs]))
    proto = ir.serde.serialize_model(model)
    return {name: split(model, proto, name, ins, outs) for name, (ins, outs) in names.items()}


def trace_pieces(cfg: DecoderConfig, spec: StackSpec, dtype: torch.dtype, batch: int | str,
                 first_layer_weights: Callable[[], dict[str, torch.Tensor]],
                 cache: "TraceCache | None" = None, log: Callable[[str], None] | None = None) -> dict[str, Piece]:
    """The rotary, layer and (if the pack has it) final-norm pieces, traced at (N=3, lastSum=5).

    ``batch``: a static batch size, or a name (the profile's "B") for a dynamic batch axis,
    traced at TRACE_BATCH rows. ``first_layer_weights()`` is called only when the pieces must
    be traced. With a ``cache`` (build/trace_cache.py), pieces found there (all three, or none
    is used) are not traced, and traced ones are stored there.
    """
    dyn = torch.export.Dim.DYNAMIC
    n, last = 3, 5          # distinct, and neither 0 nor 1, so the tracer keeps the axes symbolic
    dynamic_batch = isinstance(batch, str)
    rows = TRACE_BATCH if dynamic_batch else batch

    def axes(d: dict | None) -> dict | None:
        # A dynamic batch: axis 0 of every input is symbolic as well.
        return {0: dyn, **(d or {})} if dynamic_batch else d

    seq = 2 if spec.kv_format == 0 else 1
    kv = [rows, cfg.num_kv_heads, last, cfg.head_dim] if spec.kv_format == 0 else \
        [rows, last, cfg.num_kv_heads, cfg.head_dim]
    pos = torch.arange(last, last + n).expand(rows, n).contiguous()
    rotary = RotaryCosSin(cfg, dtype)
    cos, sin = rotary(pos)
    x = torch.randn(rows, n, cfg.hidden_size).to(dtype)
    key = (cfg, dtype, batch, spec.kv_format, spec.kv_io)

    def rotary_part():
        # Sizes unlike the layer's, so the tracer cannot take one piece's axis from the other's input.
        positions = torch.arange(7, 11).expand(rows, 4).contiguous()
        return rotary, (positions,), (axes({1: dyn}),), ["position_ids"], ["cos", "sin"]

    def layer_part():
        with torch.device("meta"):
            layer = DecoderLayer(cfg)
        layer.load_state_dict({k: v.to(dtype) for k, v in first_layer_weights().items()}, assign=True)
        step = LayerStep(layer.eval(), spec.kv_format, spec.kv_io)
        names = ["x", "mask", "cos", "sin", "past_k", "past_v"]
        dims = [axes(d) for d in ({1: dyn}, {2: dyn, 3: dyn}, {2: dyn}, {2: dyn}, {seq: dyn}, {seq: dyn})]
        if spec.kv_io == "inplace":
            # The buffer: 11 rows, of which lastSum + N = 8 are written; its length stays
            # symbolic here and takes the profile's cache_len in the stitched graph.
            buffer = kv[:seq] + [11] + kv[seq + 1:]
            past = torch.randn(buffer).to(dtype)
            mask = torch.zeros(rows, 1, n, 11, dtype=dtype)
            args = (x, mask, cos, sin, past, past.clone(), torch.full((rows,), last, dtype=torch.int64))
            names, dims = names + ["write_indices"], dims + [axes(None)]
        else:
            past = torch.randn(kv).to(dtype)
            mask = torch.zeros(rows, 1, n, last + n, dtype=dtype)
            args = (x, mask, cos, sin, past, past.clone())
        return step, args, tuple(dims), names, ["y", "k", "v"]

    def norm_part():
        norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps).to(dtype)
        return norm, (torch.randn(rows, 6, cfg.hidden_size).to(dtype),), (axes({1: dyn}),), ["x"], ["y"]

    # One trace makes all three pieces, whatever the pack needs: the tracer numbers names across
    # everything it traces together, so pieces are only ever used with the companions they were
    # traced with, and an export's bytes never depend on what was traced or cached before it.
    parts = {"rotary": rotary_part, "layer": layer_part, "norm": norm_part}
    pieces = _PIECES.get(key)
    if pieces is None and cache is not None:
        pieces = cache.load_set(key, list(parts), log)
    if pieces is None:
        pieces = _trace_together({name: make() for name, make in parts.items()})
        if cache is not None:
            cache.store_set(key, pieces, log)
    _PIECES[key] = pieces
    return {name: pieces[name] for name in ("rotary", "layer", "norm") if name != "norm" or spec.final_norm}


# A MatMul that computes a linear of the model (x @ W^T) carries W's name under this metadata key,
# in the file: the quantize stage finds each linear by it. Which initializers survive
# deduplication, or which hold equal values, says nothing about which layer a weight belongs to
# (a trained checkpoint's layers can share equal norm gains, zero biases, even whole layers).
LINEAR_MARK = "kvplan.weight"
# Initializers of at most this many elements that are equal are merged (onnx-ir's own default).
DEDUPLICATE_ELEMENTS = 1024


def finish(model: ir.Model, weights: set[str]) -> None:
    """What is left to do on the stitched graph: mark each linear's MatMul with the name of its
    weight (``weights``: the model tensors bound into the graph), fold what the weights made
    constant (their transposes for MatMul), lift constants to initializers and tidy up names.
    The model's own tensors are never merged with one another, however equal: each stays the
    initializer of its own layer. No pattern rewrites (each piece had them) and none of the
    optimizer's fusions: fusing is the surgery stage's job, with its checks and report."""
    marked = mark_linears(model.graph, weights)
    onnxscript.optimizer.fold_constants_ir(model)
    ir.passes.Sequential(
        common_passes.RemoveUnusedNodesPass(),
        common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
    )(model)
    own = {v for name, v in model.graph.initializers.items() if name in weights}
    own.update(node.inputs[1] for node in marked)
    _deduplicate_constants(model.graph, keep=own)
    ir.passes.Sequential(
        common_passes.CommonSubexpressionEliminationPass(),
        common_passes.RemoveUnusedNodesPass(),
        common_passes.NameFixPass(),
    )(model)


def mark_linears(graph: ir.Graph, weights: set[str]) -> list[ir.Node]:
    """Mark every MatMul whose second input is one of ``weights`` (or its Transpose) with its name."""
    marked = []
    for node in graph:
        if node.op_type != "MatMul":
            continue
        w = node.inputs[1]
        producer = w.producer() if w is not None else None
        if producer is not None and producer.op_type == "Transpose":
            w = producer.inputs[0]
        if w is not None and w.name in weights and w.is_initializer():
            node.metadata_props[LINEAR_MARK] = w.name
            marked.append(node)
    return marked


def _deduplicate_constants(graph: ir.Graph, keep: set[ir.Value]) -> None:
    """Merge equal small initializers (the constants every layer's copy of the piece carries),
    except those in ``keep``."""
    seen: dict[tuple, ir.Value] = {}
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if value in keep or tensor is None or tensor.size > DEDUPLICATE_ELEMENTS or value in graph.outputs:
            continue
        key = (tensor.dtype, tuple(tensor.shape), tensor.tobytes())
        if key in seen:
            value.replace_all_uses_with(seen[key])
            graph.initializers.pop(value.name)
        else:
            seen[key] = value
