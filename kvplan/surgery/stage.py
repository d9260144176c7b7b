"""The surgery stage: the passes over every pack's graph (the exported or the int4 one).

Its digest covers the upstream graphs' hashes, the passes, kvplan's surgery code and onnx's version.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvplan.lazy import lazy_import, version
from kvplan.manifest import artifact
from kvplan.pipeline import graph_artifacts
from kvplan.sources import source_digest
from kvplan.stack import pack_file_names

surgery_fileio = lazy_import("kvplan.surgery.fileio")

MODULE = "kvplan.surgery.stage"


@dataclass
class SurgeryStage:
    target: Path
    passes: tuple[str, ...]
    upstream: str                    # the stage whose graphs it reads: export, or quantize
    log: Callable[[str], None] = field(default=print, repr=False)
    name: str = "surgery"

    def inputs(self, done: dict) -> dict:
        return {"onnx": [a["sha256"] for a in graph_artifacts(done[self.upstream])], "passes": list(self.passes),
                "source": source_digest(MODULE), "onnx_version": version("onnx")}

    def build(self, done: dict) -> dict:
        graphs = graph_artifacts(done[self.upstream])
        entries = []
        for src, name in zip(graphs, pack_file_names(len(graphs), suffix=".fused.onnx")):
            self.log(f"[surgery] {src['path']} -> {name} (passes: {', '.join(self.passes)})")
            report = surgery_fileio.fuse_file(self.target / src["path"], self.target / name, list(self.passes), log=self.log)
            entries.append(artifact(self.target, self.target / name, pack=src["pack"], report=report))
        return {"artifacts": entries}
