"""CLI: kvplan surgery (or python -m surgery) IN.onnx -o OUT.onnx [--passes rmsnorm,rope] [--report report.json]

Exit codes: 0 written, 1 the rewritten graph failed a check (nothing written), 2 bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from kvplan.errors import KvplanError, OpsetError, SurgeryError, UserError
from kvplan.fileio import write_atomic
from kvplan.surgery.fileio import fuse_file
from kvplan.surgery.registry import PASSES
from kvplan.surgery.report import summary_lines


def parser(prog: str = "python -m surgery") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Fuse RMSNorm, rotary embedding and attention subgraphs of an exported decoder into ONNX "
                    "opset-23 RMSNormalization / RotaryEmbedding / Attention nodes; every candidate is checked, "
                    "near misses are reported.")
    p.add_argument("input", type=Path, help="the ONNX graph to rewrite (external data next to it is loaded too)")
    p.add_argument("-o", "--output", type=Path, required=True,
                   help="where to write the fused graph (written to a temporary name, then renamed)")
    p.add_argument("--passes", default=",".join(PASSES),
                   help=f"comma-separated passes to run, in registry order (default: {','.join(PASSES)}; "
                        "an empty string runs only the checks)")
    p.add_argument("--report", type=Path, help="also write the full report as JSON to this file")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    return p


def main(argv: list[str] | None = None, prog: str = "python -m surgery") -> int:
    args = parser(prog).parse_args(argv)
    passes = [p.strip() for p in args.passes.split(",") if p.strip()]
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        print(f"error: unknown pass {', '.join(map(repr, unknown))} (known passes: {', '.join(PASSES)})",
              file=sys.stderr)
        return 2
    if not args.input.is_file():
        print(f"error: input file not found: {args.input}", file=sys.stderr)
        return 2
    try:
        _check_outputs(args.input, args.output, args.report)
        report = fuse_file(args.input, args.output, passes, log=None, require_match=True)
        if args.report:
            write_atomic(args.report, (json.dumps(report, indent=2) + "\n").encode())
    except (SurgeryError, OpsetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KvplanError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        for line in summary_lines(report):
            print(line)
        print(f"wrote {args.output}")
    return 0




def _check_outputs(source: Path, output: Path, report: Path | None) -> None:
    """Refuse before any work: an output that is the input (by any path to it: it would replace a
    build's graph with its own rewrite), or one whose directory does not exist (made silently, a
    typo would scatter directories)."""
    for flag, path in (("-o", output), ("--report", report)):
        if path is None:
            continue
        if path.resolve() == source.resolve() or (path.exists() and os.path.samefile(path, source)):
            raise UserError(f"{flag} {path}: is the input file {source}; write the fused graph elsewhere")
        if not path.parent.is_dir():
            raise UserError(f"{flag} {path}: its directory {path.parent} does not exist")
