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
from types import ModuleType


def lazy_import(name: str) -> ModuleType:
    """``name``'s module, its code run on the first attribute access (already imported: as it is)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"No module named {name!r}", name=name)
    loader = importlib.util.LazyLoader(spec.loader)
    spec.loader = loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
    return module


def loaded(name: str) -> bool:
    """Whether ``name`` has really been imported (not only named lazily)."""
    module = sys.modules.get(name)
    return module is not None and not isinstance(module, importlib.util._LazyModule)
