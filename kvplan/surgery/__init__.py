"""Graph surgery on exported decoders: fuse RMSNorm and RoPE into opset-23 ops, with checks and a report.

    kvplan.surgery.PASSES                       ordered registry, name -> pass
    kvplan.surgery.run(model, passes, log)      -> (checked model, report dict)
    kvplan.surgery.fuse_file(in, out, passes)   -> report dict; writes atomically
    kvplan surgery IN.onnx -o OUT.onnx [--passes rmsnorm,rope] [--report report.json]
    python -m surgery ...                       the same, from the repository root
"""
from __future__ import annotations

from kvplan.errors import OpsetError, SurgeryError
from kvplan.lazy import lazy_import

# The package's names, each from its module on first use: importing a submodule (the registry, to
# check a profile's pass names) must not load the passes' ONNX machinery.
_FROM = {"PASSES": "kvplan.surgery.registry", "run": "kvplan.surgery.pipeline", "fuse_file": "kvplan.surgery.fileio",
         "summary_lines": "kvplan.surgery.report"}
_MODULES = {name: lazy_import(module) for name, module in _FROM.items()}

__all__ = ["PASSES", "run", "fuse_file", "SurgeryError", "OpsetError", "summary_lines"]


def __getattr__(name: str):
    if name in _MODULES:
        return getattr(_MODULES[name], name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
