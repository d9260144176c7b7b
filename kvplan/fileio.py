"""Files written whole or not at all, and ONNX models serialized one weight at a time.

Shared by every stage that writes an artifact (export, surgery, engines, the manifest),
so it sits below all of them.
"""
from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path
from typing import Callable, Iterable

import onnx


# Every temporary a build writes beside an artifact is named .<artifact>.kvplan-tmp-<unique>
# (files and directories alike), so the next build of the target can find what a killed one
# left behind.
TEMP_MARK = ".kvplan-tmp-"


def temp_prefix(path: Path) -> str:
    """The prefix of ``path``'s temporaries, for tempfile's mkstemp/mkdtemp in its directory."""
    return f".{path.name}{TEMP_MARK}"


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Remove the temporaries of earlier builds in ``directory``; returns their names.

    Only safe while holding the target's lock: no other build of it can be writing then.
    """
    removed = []
    if not directory.is_dir():
        return removed
    for entry in sorted(directory.glob(f".*{TEMP_MARK}*")):
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


@contextlib.contextmanager
def atomic_file(path: Path):
    """Open a same-directory temp file for writing; on a clean exit fsync it and rename it to ``path``.

    On any exception, KeyboardInterrupt included, the temp file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{temp_prefix(path)}{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def write_atomic(path: Path, data) -> int:
    """Write ``data`` (bytes or a buffer) to ``path`` atomically (see ``atomic_file``); returns its size."""
    with atomic_file(path) as f:
        f.write(data)
        size = f.tell()
    return size


def encode_varint(n: int) -> bytes:
    """protobuf's base-128 varint."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


GRAPH_FIELD = 7          # ModelProto.graph
INITIALIZER_FIELD = 5    # GraphProto.initializer


def field_header(number: int, length: int) -> bytes:
    return encode_varint(number << 3 | 2) + encode_varint(length)     # wire type 2: length-delimited


def write_streamed(head: onnx.ModelProto, tensors: Callable[[], Iterable[onnx.TensorProto]], f) -> None:
    """Write ``head`` with the initializers ``tensors()`` yields appended to its graph, to ``f``.

    ``model.SerializeToString()`` would hold two extra copies of every weight (the proto and
    its bytes). Protobuf lets a message's fields come in any order, and a repeated field's
    entries may be spread out, so the file is written as the model without its graph, then
    the graph field: the graph's own bytes followed by one initializer entry per tensor,
    each serialized when it is written. ``tensors`` is called twice (sizes, then bytes).
    """
    rest = onnx.ModelProto()
    rest.CopyFrom(head)
    rest.ClearField("graph")
    graph = head.graph.SerializeToString()
    sizes = [t.ByteSize() for t in tensors()]
    graph_len = len(graph) + sum(len(field_header(INITIALIZER_FIELD, n)) + n for n in sizes)
    f.write(rest.SerializeToString())
    f.write(field_header(GRAPH_FIELD, graph_len))
    f.write(graph)
    for size, t in zip(sizes, tensors()):
        data = t.SerializeToString()
        if len(data) != size:
            raise RuntimeError(f"initializer {t.name!r} serialized to {len(data)} bytes, {size} expected")
        f.write(field_header(INITIALIZER_FIELD, size))
        f.write(data)


def umask() -> int:
    # Read, not set-and-restore: os.umask would change it for every thread for a moment.
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
