"""Polygraphy JSON files written one element at a time.

``polygraphy.json.save_json`` (and ``RunResults.save``) build the whole JSON text in
memory: every point's inputs or outputs base64-encoded at once, about 1.4x their
bytes. These writers produce the same text, byte for byte, from one element at a
time: the file's skeleton (a list, or a RunResults of one runner) is encoded by
Polygraphy itself around a placeholder, and each element is encoded by Polygraphy's
own encoder at the placeholder's indentation and streamed to the file.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from polygraphy import constants
from polygraphy.comparator import IterationResult, RunResults
from polygraphy.json import Encoder, to_json

_HOLE = "\x00kvplan-elements\x00"


class _Base64(str):
    """An array's base64 payload: nothing in it needs JSON escaping."""


def _encode_string(text: str) -> str:
    # Escaping scans every character; a payload of hundreds of MB needs only its quotes.
    return f'"{text}"' if type(text) is _Base64 else json.encoder.encode_basestring_ascii(text)


def _float(value: float) -> str:
    # json's own rule (allow_nan): float.__repr__, or the JavaScript names of the non-finite values.
    if value != value:
        return "NaN"
    if value in (float("inf"), float("-inf")):
        return "Infinity" if value > 0 else "-Infinity"
    return float.__repr__(value)


class _Encoder(Encoder):
    """Polygraphy's encoder, writing the same text, with array payloads left unescaped."""

    def default(self, o):
        out = super().default(o)
        if isinstance(out, dict) and isinstance(out.get("array"), str):
            out = {k: (_Base64(v) if k == "array" else v) for k, v in out.items()}
        return out

    def iterencode(self, o, _one_shot=False):
        return json.encoder._make_iterencode(
            {} if self.check_circular else None, self.default, _encode_string, self.indent, _float,
            self.key_separator, self.item_separator, self.sort_keys, self.skipkeys, _one_shot)(o, 0)


class JsonListWriter:
    """A JSON file whose one list (``[_HOLE]`` inside ``skeleton``) is filled by ``append``.

    Written under a temporary name and renamed by ``close``; ``abort`` removes it.
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
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        self._file = open(self._tmp, "w")
        self._file.write(self._head)
        self._count = 0
        self._encoder = _Encoder(indent=constants.TAB)

    def append(self, element) -> None:
        self._file.write(",\n" if self._count else "\n")
        self._file.write(self._indent)
        # iterencode yields small chunks plus one chunk per base64 payload (which holds no newline, so
        # replace returns it unchanged): nothing of the element but its current array is held as text.
        for chunk in self._encoder.iterencode(element):
            self._file.write(chunk.replace("\n", "\n" + self._indent))
        self._count += 1

    def close(self) -> None:
        self._file.write(("\n" + self._outer if self._count else "") + self._tail)
        self._file.close()
        os.replace(self._tmp, self.path)

    def abort(self) -> None:
        self._file.close()
        self._tmp.unlink(missing_ok=True)


def inputs_writer(path: Path) -> JsonListWriter:
    """The data-loader file ``polygraphy run --load-inputs`` reads: a list of feed dicts."""
    return JsonListWriter(path, [_HOLE])


def outputs_writer(path: Path, runner: str) -> JsonListWriter:
    """One runner's ``RunResults`` (``--load-outputs``), appended ``IterationResult`` by iteration."""
    return JsonListWriter(path, RunResults([(runner, [_HOLE])]))


def iteration(outputs, runner: str, runtime: float | None) -> IterationResult:
    return IterationResult(outputs=outputs, runtime=runtime, runner_name=runner)
