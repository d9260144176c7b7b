"""The engines stage: one TensorRT plan per pack (and per embedding and head graph), with the
profile's optimization profiles.

Its digest covers the upstream graphs' hashes, the profile's whole [engine] section (the
optimization profiles and every builder option), the batch range, the backend and its version,
and kvplan's TensorRT code.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

from kvplan.embed_head.stage import end_graphs
from kvplan.lazy import lazy_import
from kvplan.manifest import artifact
from kvplan.pipeline import graph_artifacts, trim_heap
from kvplan.sources import source_digest
from kvplan.stack import export_specs, io_contract, pack_file_names
from kvplan.trt.backend import Backend

trt_build = lazy_import("kvplan.trt.build")

MODULE = "kvplan.trt.stage"


def weight_copy_notes(profile) -> list[str]:
    """What makes the plans hold the weights twice: beside another optimization profile, one whose N
    (and batch) is fixed at 1 gets every linear's weights again, laid out for M = 1 kernels
    (TensorRT-RTX 1.7, bench/weight_copies.py)."""
    if len(profile.shapes) < 2 or profile.export.batch_range.max > 1:
        return []
    return [f"optimization profile {sp.name!r} fixes N at 1: TensorRT-RTX stores a second copy of every "
            f"linear's weights for it; N = [1, 1, 2] keeps one (the opt shape unchanged)"
            for sp in profile.shapes if sp.N.max == 1]


@dataclass
class EngineStage:
    source: object                   # a kvplan.models.ModelSource
    profile: object                  # a kvplan.profiles.Profile
    target: Path
    backend: Backend
    upstream: str                    # the stage whose graphs it builds: surgery, quantize or export
    ends: str | None = None          # the embed_head stage, where the target has one: its graphs too
    log: Callable[[str], None] = field(default=print, repr=False)
    name: str = "engines"
    # The builder's heap is the pipeline's peak (2x the weights): started in a process of its own
    # it does not sit on the export's torch and heap (kvplan.pipeline).
    own_process: ClassVar[bool] = True

    def inputs(self, done: dict) -> dict:
        # The whole [engine] section, and the batch range the optimization profiles take.
        return {"onnx": [a["sha256"] for a in graph_artifacts(done[self.upstream])],
                "ends": {name: a["sha256"] for name, a in end_graphs(done.get(self.ends)).items()},
                "engine": asdict(self.profile.engine), "batch": self.profile.export.batch_range.as_list(),
                "backend": self.backend.name, "backend_version": self.backend.version, "source": source_digest(MODULE)}

    def build(self, done: dict) -> dict:
        p, cfg, backend = self.profile, self.source.config, self.backend
        for note in weight_copy_notes(p):
            self.log(f"[engines] note: {note}")
        specs = export_specs(cfg, p.export)
        entries = []
        for spec, src, name in zip(specs, graph_artifacts(done[self.upstream]), pack_file_names(len(specs), suffix=".plan")):
            self.log(f"[engines] {src['path']} -> {name} ({backend.name} {backend.version}, "
                     f"profiles: {', '.join(s.name for s in p.shapes)})")
            record = trt_build.build_engine(self.target / src["path"], self.target / name, p,
                                  io_contract(cfg, spec, p.export.batch_dim, p.dtype), backend,
                                  self.target / p.engine.timing_cache if p.engine.timing_cache else None, log=self.log)
            entries.append(artifact(self.target, self.target / name, pack=src["pack"], build=record))
            trim_heap()         # the builder's freed heap, before the next plan's build
        for graph, src in end_graphs(done.get(self.ends)).items():
            plan = self.target / f"{graph}.plan"
            self.log(f"[engines] {src['path']} -> {plan.name}")
            record = trt_build.build_engine(self.target / src["path"], plan, p, src["io"], backend,
                                  self.target / p.engine.timing_cache if p.engine.timing_cache else None, log=self.log)
            entries.append(artifact(self.target, plan, graph=graph, build=record))
            trim_heap()
        return {"artifacts": entries, "backend": backend.name, "backend_version": backend.version}
