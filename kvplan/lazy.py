"""The one lazy-import mechanism: ``name = lazy_import("module")`` at a module's top names the
dependency where it is visible, and imports it on the first attribute access.

A command that decides something small (``kvplan presets``, ``--help``, a rebuild with nothing to
do) must not pay for torch, transformers, ONNX, ONNX Runtime, Polygraphy or TensorRT, which take
seconds to import; a stage imports its libraries when it runs. kvplan's own modules named this
way are part of the stages' source digests as imported ones are (kvplan.sources reads these
calls too).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from importlib import metadata
from types import ModuleType


class _Lazy(ModuleType):
    """Stands for a module until an attribute is asked for, then imports it the usual way (so the
    import system, circular imports included, sees nothing unusual). Every attribute is read from
    the real module each time, never copied: a name the module rebinds later (a test's monkeypatch)
    is seen as rebound."""

    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_kvplan_lazy_target"] = name

    def __getattr__(self, attr: str):
        return getattr(importlib.import_module(self.__dict__["_kvplan_lazy_target"]), attr)

    def __setattr__(self, attr: str, value) -> None:
        setattr(importlib.import_module(self.__dict__["_kvplan_lazy_target"]), attr, value)


def lazy_import(name: str) -> ModuleType:
    """``name``'s module, imported on the first attribute access (already imported: the module)."""
    if name in sys.modules:
        return sys.modules[name]
    if importlib.util.find_spec(name.partition(".")[0]) is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    return _Lazy(name)


def loaded(name: str) -> bool:
    """Whether ``name`` has really been imported (not only named lazily)."""
    return name in sys.modules


def version(distribution: str) -> str:
    """The installed version of ``distribution`` (pip's name), read from its metadata: what a stage's
    digest records of a library without importing it."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "not installed"
