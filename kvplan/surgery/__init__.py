"""Graph surgery on exported decoders: fuse RMSNorm and RoPE into opset-23 ops, with checks and a report.

    kvplan.surgery.PASSES                       ordered registry, name -> pass
    kvplan.surgery.run(model, passes, log)      -> (checked model, report dict)
    kvplan.surgery.fuse_file(in, out, passes)   -> report dict; writes atomically
    kvplan surgery IN.onnx -o OUT.onnx [--passes rmsnorm,rope] [--report report.json]
    python -m surgery ...                       the same, from the repository root
"""
from __future__ import annotations

from kvplan.errors import OpsetError, SurgeryError
from kvplan.surgery.fileio import fuse_file
from kvplan.surgery.pipeline import run
from kvplan.surgery.registry import PASSES
from kvplan.surgery.report import summary_lines

__all__ = ["PASSES", "run", "fuse_file", "SurgeryError", "OpsetError", "summary_lines"]
