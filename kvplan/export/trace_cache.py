"""Traced pieces kept on disk, so a rebuild of an architecture already seen skips the trace.

The trace (kvplan/export/stitch.py) is most of the export stage's time and the only part that
needs the exporter at all, yet its result depends on nothing a rebuild usually changes:
not on the weights (every copy of a piece is bound to its own), only on the
architecture, dtype, batch, cache layout, kvplan's decoder code and the versions of
the libraries that produced it. Each piece is one ONNX file named by a digest of all
of that; any change makes a new name, so an entry is never stale, only unused.

The three pieces come from one trace and are stored and loaded together (the tracer's
names depend on what it traced alongside). The layer piece was traced with the
checkpoint's first layer, and neither its values nor the norm's are ever used (every
copy is bound to the checkpoint's tensors): they are not stored. The rotary piece's
values (its frequencies, derived from the config) are.

Each entry stores the digest it is named by, and is used only when that digest is the one
its key gives now: a valid ONNX file holding another piece (an entry copied over another) or
another key's trace is no entry for this key.

A cache problem never fails a build: an unreadable or mismatched entry is reported in one line
naming its file, traced again and replaced.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvplan.errors import ExportError
from kvplan.fileio import atomic_file
from kvplan.lazy import lazy_import
from kvplan.sources import source_digest

onnx = lazy_import("onnx")
ir = lazy_import("onnx_ir")
onnxscript = lazy_import("onnxscript")
torch = lazy_import("torch")

ENV = "KVPLAN_CACHE_DIR"
FORMAT = 1
# Stored values ride in the piece's graph as initializers under this prefix.
_VALUE_PREFIX = "kvplan.cached_value/"
# Pieces whose traced values are never used: every copy is bound to the checkpoint's tensors.
_BOUND_ONLY = ("layer", "norm")
# The metadata entry holding the digest (``digest(piece, key)``) an entry was written for.
_DIGEST_KEY = "kvplan.digest"
# kvplan's code that decides what a trace contains (with everything it imports).
_TRACED_MODULE = "kvplan.export.stitch"


@dataclass
class Piece:
    """A traced module as a reusable graph: weights lifted out to named inputs."""
    graph_proto: object              # onnx.GraphProto; deserialized afresh for each copy
    weight_names: list[str]          # the piece's own parameter names (e.g. "layer.self_attn.q_proj.weight")
    weights: dict[str, ir.Tensor]    # the traced module's own values (used where no override is given)
    functions: dict                  # ONNX functions the piece calls
    opsets: dict[str, int]


def default_dir() -> Path:
    """$KVPLAN_CACHE_DIR, else $XDG_CACHE_HOME/kvplan, else ~/.cache/kvplan."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kvplan"


@dataclass
class TraceCache:
    """Pieces under ``root``/traces; ``hits``/``stored``/``problems`` say what this run did."""
    root: Path
    hits: list[str] = field(default_factory=list)
    stored: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.root / "traces"

    def path(self, piece: str, key: tuple) -> Path:
        return self.directory / f"{piece}-{digest(piece, key)}.onnx"

    def load_set(self, key: tuple, pieces: list[str], log: Callable[[str], None] | None = None):
        """{piece: Piece} for every one of ``pieces`` (traced together), or None when any is
        missing, cannot be read or was not written for ``key`` (said through ``log``): they are used
        together or not at all, and the trace that follows replaces them."""
        found = {}
        for piece in pieces:
            path = self.path(piece, key)
            if not path.is_file():
                return None
            try:
                found[piece] = _read(path, digest(piece, key))
                continue
            except ExportError as e:     # readable, but stored for another key (or none)
                why = f"{path}: trace cache entry not made for this key ({e}); tracing again and replacing it"
            except Exception as e:  # noqa: BLE001 - any unreadable entry is traced again
                why = f"{path}: unreadable trace cache entry ({type(e).__name__}: {e}); tracing again and replacing it"
            self.problems.append(why)
            if log:
                log(f"[export] note: {why}")
            return None
        self.hits += pieces
        return found

    def store_set(self, key: tuple, pieces: dict, log: Callable[[str], None] | None = None) -> None:
        for piece, value in pieces.items():
            path = self.path(piece, key)
            try:
                _write(path, value, keep_values=piece not in _BOUND_ONLY, description={"piece": piece, **_describe(key)},
                       key_digest=digest(piece, key))
            except Exception as e:  # noqa: BLE001 - a cache problem never fails a build
                why = f"{path}: could not write the trace cache ({type(e).__name__}: {e}); the build goes on without it"
                self.problems.append(why)
                if log:
                    log(f"[export] note: {why}")
                continue
            self.stored.append(piece)

    def record(self) -> dict:
        return {"dir": str(self.directory), "hits": self.hits, "stored": self.stored, "problems": self.problems}


def digest(piece: str, key: tuple) -> str:
    ident = {"format": FORMAT, "piece": piece, "key": _describe(key),
             "versions": {"torch": torch.__version__, "onnxscript": onnxscript.__version__,
                          "onnx_ir": ir.__version__, "onnx": onnx.__version__},
             "source": source_digest(_TRACED_MODULE)}
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _describe(key: tuple) -> dict:
    """The trace key (DecoderConfig, torch dtype, batch, kv_format, kv_io) as JSON-able data."""
    cfg, dtype, batch, kv_format, kv_io = key
    return {"config": cfg.to_dict(), "dtype": str(dtype), "batch": batch, "kv_format": kv_format, "kv_io": kv_io}


def _write(path: Path, piece, keep_values: bool, description: dict, key_digest: str) -> None:
    model = onnx.ModelProto(ir_version=10, producer_name="kvplan trace cache")
    model.graph.CopyFrom(piece.graph_proto)
    for fn in piece.functions.values():
        model.functions.append(ir.serde.serialize_function(fn))
    for domain, version in piece.opsets.items():
        model.opset_import.add(domain=domain, version=version)
    if keep_values:
        for name in piece.weight_names:
            tensor = ir.serde.serialize_tensor(piece.weights[name])
            tensor.name = _VALUE_PREFIX + name
            model.graph.initializer.append(tensor)
    meta = {"kvplan.weight_names": piece.weight_names, "kvplan.key": description}
    for k, v in meta.items():
        model.metadata_props.add(key=k, value=json.dumps(v, default=str))
    model.metadata_props.add(key=_DIGEST_KEY, value=key_digest)
    with atomic_file(path) as f:
        f.write(model.SerializeToString())


def _read(path: Path, key_digest: str):
    model = onnx.ModelProto()
    model.ParseFromString(path.read_bytes())
    meta = {p.key: p.value for p in model.metadata_props}
    stored = meta.get(_DIGEST_KEY)
    if stored != key_digest:
        raise ExportError(f"it stores no key digest, {key_digest} expected" if stored is None else
                         f"it stores key digest {stored}, {key_digest} expected")
    weight_names = json.loads(meta["kvplan.weight_names"])
    graph_inputs = [i.name for i in model.graph.input]
    if graph_inputs[len(graph_inputs) - len(weight_names):] != weight_names:
        raise ValueError("its weight inputs are not the graph's last inputs")
    weights = {}
    for t in model.graph.initializer:
        if t.name.startswith(_VALUE_PREFIX):
            own = onnx.TensorProto()     # its own proto: a deserialized tensor keeps pointing into it
            own.CopyFrom(t)
            own.name = t.name[len(_VALUE_PREFIX):]
            weights[own.name] = ir.serde.deserialize_tensor(own)
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    graph.initializer.extend(t for t in model.graph.initializer if not t.name.startswith(_VALUE_PREFIX))
    functions = {}
    for proto in model.functions:
        fn = ir.serde.deserialize_function(proto)
        functions[fn.identifier()] = fn
    return Piece(graph, weight_names, weights, functions, {o.domain: o.version for o in model.opset_import})
