"""The parsed network: ONNX parsing, its summary and layer table, and the I/O contract check."""
from __future__ import annotations

from pathlib import Path

from kvplan.trt.backend import Backend
from kvplan.trt.errors import BuildError
from kvplan.trt.mapped_weights import MappedWeights
from kvplan.trt.shapes import dims

TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
              "bool": "BOOL", "int8": "INT8"}


def parse(trt, backend: Backend, onnx_path: Path, logger, log=None):
    """(builder, network, parser, weights) for ``onnx_path``; the parser and ``weights`` (a
    MappedWeights, or None where the parser copied them) must outlive the network."""
    if not onnx_path.is_file():
        raise BuildError(f"{onnx_path}: no such ONNX file")
    builder = trt.Builder(logger)
    network = builder.create_network(backend.strongly_typed_flag)
    parser = trt.OnnxParser(network, logger)
    weights, why = _mapped_weights(onnx_path, parser)
    ok = False
    if weights is not None and why is None:
        ok = parser.parse_model_proto()
        if not ok:
            why = f"{onnx_path}: the parser failed on the mapped weights"
    if why:
        if log:
            log(f"[build] note: {why}; the parser reads the weights itself")
        # The first parser may hold pointers into the maps: it goes before they do.
        del parser, network
        weights = None
        network = builder.create_network(backend.strongly_typed_flag)
        parser = trt.OnnxParser(network, logger)
    if not ok:
        # parse_from_file, not parse(bytes): external data files are found next to the graph.
        ok = parser.parse_from_file(str(onnx_path))
    if not ok:
        lines = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            where = ""
            if e.node() >= 0 or e.node_name():
                op = e.node_operator() if hasattr(e, "node_operator") else ""
                where = f" at node {e.node()} {e.node_name()!r}" + (f" ({op})" if op else "")
            lines.append(f"{e.code().name}{where}: {e.desc()}")
        if not lines:
            lines = logger.errors[-5:] or ["(no parser errors reported)"]
        if backend.lacks:
            lines.append(f"{backend.name} {backend.version} lacks: " + "; ".join(backend.lacks)
                         + " (build without those surgery passes / kv_io, or use a newer TensorRT)")
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(lines))
    if network.num_inputs == 0 or network.num_outputs == 0 or network.num_layers == 0:
        # Arbitrary bytes can decode as an (empty) protobuf message: the parser then "succeeds".
        raise BuildError(f"{onnx_path}: TensorRT's ONNX parser found no graph ({network.num_inputs} inputs, "
                         f"{network.num_outputs} outputs, {network.num_layers} layers): not an ONNX model, "
                         f"or a corrupted one")
    return builder, network, parser, weights


def _mapped_weights(onnx_path: Path, parser):
    """(MappedWeights, why not): (loaded into ``parser``, None), (None, None) when there is nothing
    to map or no API for it, or (whatever part is loaded, the reason) when mapping failed."""
    if not hasattr(parser, "load_model_proto"):
        return None, None
    weights = None
    try:
        weights = MappedWeights.open(onnx_path)
        if not weights.entries:
            return None, None       # nothing worth mapping: parse_from_file
        why = weights.load_into(parser)
    except Exception as e:  # noqa: BLE001 - e.g. not ONNX, or a missing data file: the parser's error says more
        why = f"{type(e).__name__}: {e}"
    return weights, (f"{onnx_path}: weights not mapped ({why})" if why else None)


def network_summary(network) -> dict:
    types: dict[str, int] = {}
    for i in range(network.num_layers):
        t = network.get_layer(i).type.name
        types[t] = types.get(t, 0) + 1

    def io(t):
        return {"shape": dims(t.shape), "dtype": t.dtype.name}

    return {
        "layers": network.num_layers,
        "layer_types": dict(sorted(types.items(), key=lambda kv: (-kv[1], kv[0]))),
        "inputs": {network.get_input(i).name: io(network.get_input(i)) for i in range(network.num_inputs)},
        "outputs": {network.get_output(i).name: io(network.get_output(i)) for i in range(network.num_outputs)},
    }


def layer_table(network) -> list[dict]:
    rows = []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = []
        for j in range(layer.num_outputs):
            t = layer.get_output(j)
            outs.append({"name": t.name, "dtype": t.dtype.name, "shape": dims(t.shape)})
        rows.append({"index": i, "name": layer.name, "type": layer.type.name, "outputs": outs})
    return rows


def check_network_inputs(network, contract: dict, onnx_path: Path) -> None:
    """The parsed network's inputs must be the contract's: names, ranks, fixed dims, dtypes."""
    want = contract["inputs"]
    have = {network.get_input(i).name: network.get_input(i) for i in range(network.num_inputs)}
    problems = []
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing:
        problems.append(f"missing inputs {missing}")
    if extra:
        problems.append(f"unexpected inputs {extra}")
    for name, info in want.items():
        t = have.get(name)
        if t is None:
            continue
        got = dims(t.shape)
        if len(got) != len(info["shape"]):
            problems.append(f"{name}: rank {len(got)} {got}, contract {info['shape']}")
            continue
        for axis, (d, c) in enumerate(zip(got, info["shape"])):
            if isinstance(c, int) and d != -1 and d != c:
                problems.append(f"{name}: axis {axis} is {d}, contract {c}")
            if isinstance(c, str) and d != -1:
                problems.append(f"{name}: axis {axis} ({c}) is static {d} in the graph; it must be dynamic")
        want_dt = TRT_DTYPES.get(info.get("dtype", ""))
        if want_dt and t.dtype.name != want_dt:
            problems.append(f"{name}: dtype {t.dtype.name}, contract {info['dtype']}")
    if problems:
        raise BuildError(f"{onnx_path}: network inputs do not match the I/O contract: " + "; ".join(problems))


def allow_decomposed_attention(trt, network) -> int:
    """Let every fused attention layer fall back to its decomposed form.

    The parser leaves ``decomposable`` off, and TensorRT-RTX has no dedicated
    kernel for some cases (every fp32 attention, for one), where the build then
    fails outright. With the flag the builder still picks the fused kernel where
    one exists. Returns the number of attention layers.

    TensorRT before 10.14 has no attention layer (its parser leaves Attention nodes unparsed),
    so there is nothing to flag there.
    """
    attention = getattr(trt.LayerType, "ATTENTION_INPUT", None)
    if attention is None:
        return 0
    count = 0
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == attention:
            layer.__class__ = trt.IAttentionInputLayer
            layer.attention.decomposable = True
            count += 1
    return count
