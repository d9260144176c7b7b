"""Polygraphy JSON files written one element at a time.

``polygraphy.json.save_json`` (and ``RunResults.save``) build the whole JSON text in
memory: every point's inputs or outputs base64-encoded at once, about 1.4x their
bytes. These writers produce the same text, byte for byte, from one element at a
time: the file's skeleton (a list, or a RunResults of one runner) is encoded by
Polygraphy itself around a placeholder, and each element is encoded by Polygraphy's
own encoder at the placeholder's indentation and streamed to the file, its arrays'
base64 payloads a few MB at a time straight from the arrays' memory.
"""
from __future__ import annotations

import binascii
import io
import json
from pathlib import Path

import numpy as np
from polygraphy import constants
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import Encoder, to_json

from kvplan.fileio import atomic_file, naming_write_errors

_HOLE = "\x00kvplan-elements\x00"
# Where an array's base64 payload goes in the encoder's text; the writer streams it there.
_PAYLOAD = "\x00kvplan-payload\x00"
# Bytes of an array encoded at a time: base64 of a byte stream cut at multiples of 3 is the
# concatenation of the pieces' base64.
CHUNK = 3 << 20


class _Payload(str):
    """Stands in the encoder's text for an array's base64 payload."""


def _encode_string(text: str) -> str:
    return _PAYLOAD if type(text) is _Payload else json.encoder.encode_basestring_ascii(text)


def _float(value: float) -> str:
    # json's own rule (allow_nan): float.__repr__, or the JavaScript names of the non-finite values.
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


def _streamable(o) -> bool:
    return type(o) is np.ndarray and o.flags.c_contiguous and not o.dtype.hasobject


class _Encoder(Encoder):
    """Polygraphy's encoder, except that a C-ordered numpy array's payload is left for the writer
    (``pending``): Polygraphy's own builds it whole, a few copies of the array at once."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.pending: list[np.ndarray] = []

    def default(self, o):
        if _streamable(o):
            # Polygraphy's own dict (its keys, its type marker) for an empty array, with the payload left out.
            out = super().default(np.empty(0, o.dtype))
            self.pending.append(o)
            return {k: (_Payload() if k == "array" else v) for k, v in out.items()}
        return super().default(o)

    def iterencode(self, o, _one_shot=False):
        return json.encoder._make_iterencode(
            {} if self.check_circular else None, self.default, _encode_string, self.indent, _float,
            self.key_separator, self.item_separator, self.sort_keys, self.skipkeys, _one_shot)(o, 0)


def _write_payload(file, array: np.ndarray) -> None:
    """The quoted base64 of what ``np.save`` writes for ``array`` (what Polygraphy encodes), read
    straight from the array's memory a chunk at a time."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, np.lib.format.header_data_from_array_1_0(array))
    head = head.getvalue()
    data = memoryview(array.reshape(-1)).cast("B") if array.size else memoryview(b"")
    lead = -len(head) % 3                        # data bytes that complete the header's last group of 3
    file.write(b'"')
    file.write(binascii.b2a_base64(head + data[:lead].tobytes(), newline=False))
    for start in range(lead, len(data), CHUNK):
        file.write(binascii.b2a_base64(data[start:start + CHUNK], newline=False))
    file.write(b'"')


class JsonListWriter:
    """A JSON file whose one list (``[_HOLE]`` inside ``skeleton``) is filled by ``append``.

    Written under a temporary name (kvplan.fileio.atomic_file) and renamed by ``close``; ``abort``
    removes it.
    """

    def __init__(self, path: Path, skeleton):
        self.path = Path(path)
        text = to_json(skeleton)                          # also registers Polygraphy's array encoders
        hole = json.dumps(_HOLE)
        at = text.index(hole)
        # The list's opening bracket sits on the line before the placeholder; its indent is the element's.
        line_start = text.rindex("\n", 0, at) + 1
        self._indent = text[line_start:at]
        self._outer = self._indent[:-len(constants.TAB)]
        self._head = text[:line_start - 1]                # up to and including "["
        self._tail = text[text.index("\n", at):].removeprefix("\n" + self._outer)  # from "]" on
        self._writing = atomic_file(self.path)
        self._file = self._writing.__enter__()
        self._write(self._head)
        self._count = 0
        self._encoder = _Encoder(indent=constants.TAB)

    def _write(self, text: str) -> None:
        self._file.write(text.encode("ascii"))           # the encoder escapes everything else

    def append(self, element) -> None:
        with naming_write_errors(self.path):
            self._append(element)

    def _append(self, element) -> None:
        self._write(",\n" if self._count else "\n")
        self._write(self._indent)
        # Nothing of the element is held as text but small chunks; each array's payload is encoded
        # from the array where the encoder left its place holder.
        for chunk in self._encoder.iterencode(element):
            pieces = chunk.replace("\n", "\n" + self._indent).split(_PAYLOAD)
            self._write(pieces[0])
            for piece in pieces[1:]:
                _write_payload(self._file, self._encoder.pending.pop(0))
                self._write(piece)
        self._count += 1

    def close(self) -> None:
        try:
            with naming_write_errors(self.path):
                self._write(("\n" + self._outer if self._count else "") + self._tail)
        except BaseException:
            self.abort()
            raise
        self._writing.__exit__(None, None, None)

    def abort(self) -> None:
        # An exception thrown into the atomic writer: it removes its temporary, writes nothing.
        stop = RuntimeError(f"{self.path}: not written (aborted)")
        self._writing.__exit__(type(stop), stop, None)


def inputs_writer(path: Path) -> JsonListWriter:
    """The data-loader file ``polygraphy run --load-inputs`` reads: a list of feed dicts."""
    return JsonListWriter(path, [_HOLE])


def outputs_writer(path: Path, runner: str) -> JsonListWriter:
    """One runner's ``RunResults`` (``--load-outputs``), appended ``IterationResult`` by iteration."""
    return JsonListWriter(path, RunResults([(runner, [_HOLE])]))


def iteration(outputs, runner: str, runtime: float | None) -> IterationResult:
    return IterationResult(outputs=outputs, runtime=runtime, runner_name=runner)
