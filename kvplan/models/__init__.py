"""Where a decoder's architecture and weights come from.

``resolve(arg)`` turns the CLI's ``--model`` (a preset name, a checkpoint
directory or a GGUF file) into a :class:`ModelSource`. Each kind of source is one module here,
registered in ``SOURCES``; the first whose ``accepts`` says yes wins.
"""
from __future__ import annotations

from pathlib import Path

from kvplan.lazy import lazy_import
from kvplan.models.base import ModelError, ModelSource

# Order matters: a MiniCPM-o directory and a pre-quantized one are also Hugging Face directories.
# Each module is imported when it is first asked whether it accepts a --model (a GGUF's reader
# loads numpy and gguf: a preset never needs them).
presets = lazy_import("kvplan.models.presets")
SOURCES = [presets, *(lazy_import(f"kvplan.models.{name}") for name in ("gguf", "minicpmo", "quantized_dir", "hf_dir"))]

DEFAULT_MODEL = "minicpmo26-tts"         # kvplan.models.presets.DEFAULT (a test holds them equal)


def resolve(arg: str) -> ModelSource:
    for source in SOURCES:
        if source.accepts(arg):
            return source.load(arg)
    path = Path(arg)
    if path.is_dir():
        raise ModelError(f"{arg}: no config.json in this directory; expected a Hugging Face checkpoint directory")
    if path.exists():
        raise ModelError(f"{arg}: not a directory or a GGUF file; --model takes a preset name, a checkpoint "
                         f"directory or a .gguf file")
    raise ModelError(f"unknown model {arg!r}: not a preset ({', '.join(presets.PRESETS)}), a directory or a "
                     f"GGUF file")


__all__ = ["ModelError", "ModelSource", "resolve", "DEFAULT_MODEL", "SOURCES"]
