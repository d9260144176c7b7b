"""Files written whole or not at all, and ONNX models serialized one weight at a time.

Shared by every stage that writes an artifact (export, quantize, surgery, engines, validation's
files, the manifest), so it sits below all of them. Every file a build writes goes through
``atomic_file`` or ``atomic_directory``: temporaries carry TEMP_MARK, finished files the umask's mode.

Nothing is fsynced, as make and ninja do not: a killed build's files are whole in the page cache,
and what a crash of the machine could cost (a renamed file whose bytes never reached the disk) the
next build finds, since it trusts no file identity recorded before the last boot and hashes those
files instead (kvplan.manifest). An fsync would make each stage wait for the disk, and with ext4's
ordered journal for every other file's writes too: 0.2 to 1 s of an export of the default model.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from kvplan.errors import WriteError
from kvplan.lazy import lazy_import

onnx = lazy_import("onnx")
ir = lazy_import("onnx_ir")

# Every temporary a build writes beside an artifact is named .<artifact>.kvplan-tmp-<unique>
# (files and directories alike), so the next build of the target can find what a killed one
# left behind.
TEMP_MARK = ".kvplan-tmp-"


def temp_prefix(path: Path) -> str:
    """The prefix of ``path``'s temporaries, for tempfile's mkstemp/mkdtemp in its directory."""
    return f".{path.name}{TEMP_MARK}"


def is_temporary(name: str) -> bool:
    return name.startswith(".") and TEMP_MARK in name


def remove_stale_temporaries(directory: Path) -> list[str]:
    """Remove the temporaries of earlier builds in ``directory`` and below (validation/ has its
    own); returns their paths relative to it.

    Only safe while holding the target's lock: no other build of it can be writing then.
    """
    removed = []
    if not directory.is_dir():
        return removed
    for root, dirs, files in os.walk(directory):
        for name in sorted(n for n in dirs + files if is_temporary(n)):
            entry = Path(root) / name
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(str(entry.relative_to(directory)))
        dirs[:] = sorted(d for d in dirs if not is_temporary(d))
    return removed


def finished_mode() -> int:
    """The mode of a finished artifact: what open() gives a new file under the process umask
    (mkstemp's, safetensors' and onnx's temporaries are created 0600)."""
    return 0o666 & ~umask()


def write_error(path: Path, e: OSError) -> WriteError:
    err = WriteError(f"{path}: could not be written: {e.strerror or e} (directory {path.parent}); "
                     f"nothing was left under its name")
    err.errno = e.errno         # not strerror: OSError.__str__ would then print that instead
    return err


@contextlib.contextmanager
def naming_write_errors(path: Path):
    """An OSError that names no file (write(2) or close(2) on a descriptor: a full disk, a quota)
    becomes a WriteError naming ``path``; the CLI prints it on one line."""
    try:
        yield
    except WriteError:
        raise
    except OSError as e:
        if e.filename is not None:
            raise
        raise write_error(path, e) from e


@contextlib.contextmanager
def atomic_file(path: Path):
    """Open a same-directory temp file for writing; on a clean exit rename it to ``path``.

    On any exception, KeyboardInterrupt included, the temp file is removed and ``path`` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{temp_prefix(path)}{os.getpid()}"
    try:
        with naming_write_errors(path):
            with open(tmp, "wb") as f:
                os.fchmod(f.fileno(), finished_mode())     # also when an earlier run left it private
                yield f
            # Closed first: a network file system reports a failed write at close.
            os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_directory(path: Path, companions: tuple[str, ...] = ()):
    """For writers that open files by name (safetensors, ONNX with external data): yield a new,
    marked temporary directory beside ``path``, in which the body writes ``path.name`` and any of
    ``companions`` (names of files that belong with it, e.g. ``decoder.onnx.data``).

    On a clean exit each file gets the finished mode and is renamed beside ``path``,
    companions first (a graph never lands pointing at a data file not there yet); a companion
    not written this time is removed from beside ``path`` (it belongs to an earlier write). The
    directory goes whatever happens, with whatever the writer left in it (safetensors' own
    temporary file, too).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), dir=path.parent))
    try:
        with naming_write_errors(path):
            yield tmp
            if not (tmp / path.name).is_file():
                raise RuntimeError(f"{path}: its writer wrote no {path.name} into {tmp}")
            mode = finished_mode()
            for name in (*companions, path.name):
                written, final = tmp / name, path.parent / name
                if not written.is_file():
                    final.unlink(missing_ok=True)
                    continue
                os.chmod(written, mode)
                os.replace(written, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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

    An entry may be any object with ``ByteSize()`` and either ``write_to(f)`` (writes exactly
    that many bytes: an array's bytes written from its own buffer, an entry copied from another
    file) or ``SerializeToString()``, as a TensorProto has.
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
        f.write(field_header(INITIALIZER_FIELD, size))
        if hasattr(t, "write_to"):
            start = f.tell()
            t.write_to(f)
            written = f.tell() - start
        else:
            data = t.SerializeToString()
            written = len(data)
            f.write(data)
        if written != size:
            raise RuntimeError(f"initializer {t.name!r} serialized to {written} bytes, {size} expected")


RAW_DATA_FIELD = 9       # TensorProto.raw_data
COPY_CHUNK = 1 << 24


class ArrayEntry:
    """An initializer entry (TensorProto with raw_data) whose values are written straight from an
    array's buffer: the header fields serialized by protobuf, then the array's bytes (raw data is
    little-endian, as arrays are on every machine kvplan runs on). ``array`` is the array, or a
    callable making it when the entry is written (its ``shape`` and ``nbytes`` given)."""

    def __init__(self, name: str, array, data_type: int, shape=None, nbytes: int | None = None):
        self.name, self.array = name, array
        shape = list(array.shape) if shape is None else list(shape)
        self.nbytes = array.nbytes if nbytes is None else nbytes
        head = onnx.TensorProto(name=name, dims=shape, data_type=data_type)
        self.head = head.SerializeToString() + field_header(RAW_DATA_FIELD, self.nbytes)

    def ByteSize(self) -> int:  # noqa: N802  (protobuf's name)
        return len(self.head) + self.nbytes

    def write_to(self, f) -> None:
        array = self.array() if callable(self.array) else self.array
        if array.nbytes != self.nbytes:
            raise RuntimeError(f"initializer {self.name!r}: {array.nbytes} bytes, {self.nbytes} announced")
        f.write(self.head)
        f.write(array.reshape(-1).view("u1").data if array.flags.c_contiguous else array.tobytes())


class FileEntry:
    """An initializer entry of ``length`` bytes at ``offset`` of another ONNX file, written by
    copying its bytes unparsed."""

    def __init__(self, path: Path, offset: int, length: int, name: str):
        self.path, self.offset, self.length, self.name = Path(path), offset, length, name

    def ByteSize(self) -> int:  # noqa: N802
        return self.length

    def write_to(self, f) -> None:
        # In the kernel (copy_file_range) where it can: no pass of the bytes through this process.
        f.flush()
        left, offset = self.length, self.offset
        with open(self.path, "rb") as src:
            try:
                while left:
                    n = os.copy_file_range(src.fileno(), f.fileno(), left, offset)
                    if n == 0:
                        break
                    left, offset = left - n, offset + n
            except OSError:      # a file system without it: through a buffer
                src.seek(offset)
                while left:
                    chunk = src.read(min(left, COPY_CHUNK))
                    if not chunk:
                        break
                    f.write(chunk)
                    left, offset = left - len(chunk), offset + len(chunk)
        if left:
            raise WriteError(f"{self.path}: truncated at byte {offset}")


def ir_entry(value):
    """The entry ``write_streamed`` writes for the initializer ``value`` (an onnx_ir Value): its
    tensor's own entry where it has one (a weight still in its source file, under the same name),
    the array's bytes where they are the raw data (every type but the sub-byte ones), else the
    tensor serialized by onnx_ir."""
    tensor = value.const_value
    source = getattr(tensor, "file_entry", None)
    if source is not None and source.name == value.name:
        return source
    whole_bytes = tensor.dtype.bitwidth % 8 == 0 and tensor.dtype != ir.DataType.STRING
    if isinstance(tensor, ir.Tensor) and whole_bytes:
        array = tensor.numpy()
        if array.itemsize * 8 == tensor.dtype.bitwidth:
            return ArrayEntry(value.name, array, int(tensor.dtype))
    if isinstance(tensor, ir.LazyTensor) and whole_bytes and tensor.shape.is_static():
        # Made when written: a lazily read weight is in memory only while it is written.
        return ArrayEntry(value.name, tensor.numpy, int(tensor.dtype), tensor.shape.numpy(),
                          tensor.size * tensor.dtype.bitwidth // 8)
    proto = onnx.TensorProto()
    ir.serde.serialize_tensor_into(proto, tensor)
    proto.name = value.name
    return proto


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
