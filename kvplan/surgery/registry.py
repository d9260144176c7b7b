"""The one ordered list of passes. Adding a pass: a module in passes/ exposing PASS, and one line here."""
from __future__ import annotations

from kvplan.surgery.framework import Pass
from kvplan.surgery.passes import attention, gqa, residual2d, rmsnorm, rope

PASSES: dict[str, Pass] = {p.name: p for p in (
    rmsnorm.PASS,
    rope.PASS,
    attention.PASS,
    gqa.PASS,
    residual2d.PASS,
)}
