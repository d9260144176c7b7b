"""Graph surgery on exported decoders: fuse RMSNorm and RoPE into opset-23 ops, with checks and a report.

    surgery.PASSES                       ordered registry, name -> pass
    surgery.run(model, passes, log)      -> (checked model, report dict)
    surgery.fuse_file(in, out, passes)   -> report dict; writes atomically
    python -m surgery IN.onnx -o OUT.onnx [--passes rmsnorm,rope] [--report report.json]
"""
from __future__ import annotations

from .fileio import fuse_file
from .opset import OpsetError
from .pipeline import SurgeryError, run
from .registry import PASSES
from .report import summary_lines

__all__ = ["PASSES", "run", "fuse_file", "SurgeryError", "OpsetError", "summary_lines"]
