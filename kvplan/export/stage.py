"""The export stage: the decoder's packs of layers to ONNX, one file per pack.

Its digest covers the model's files and config, the profile's [export] settings, whether
non-finite weights were allowed, kvplan's export code and the versions of the libraries that
cast the weights and write the graphs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kvplan.lazy import lazy_import, version
from kvplan.manifest import artifact
from kvplan.pipeline import peak_rss_mib
from kvplan.sources import source_digest
from kvplan.stack import export_specs, io_contract, pack_file_names

exporter = lazy_import("kvplan.export.exporter")

MODULE = "kvplan.export.stage"


@dataclass
class ExportStage:
    source: object                   # a kvplan.models.ModelSource
    profile: object                  # a kvplan.profiles.Profile: its export settings
    target: Path
    allow_nonfinite: bool = False
    log: Callable[[str], None] = field(default=print, repr=False)
    name: str = "export"

    @property
    def specs(self) -> list:
        p = self.profile
        return export_specs(self.source.config, p.export)

    def inputs(self, _done: dict) -> dict:
        p = self.profile
        return {"model": self.source.fingerprint, "config": self.source.config.to_dict(), "dtype": p.dtype,
                # The [export] section, with the batch axis as the graphs have it (a range's sizes are the engines').
                "export": {**asdict(p.export), "batch": p.export.batch_dim}, "allow_nonfinite": self.allow_nonfinite,
                "source": source_digest(MODULE), "onnx_ir": version("onnx-ir"),
                # The weights are read and cast to the profile dtype with torch.
                "torch": version("torch")}

    def build(self, _done: dict) -> dict:
        p, cfg, specs = self.profile, self.source.config, self.specs
        entries, weight_bytes = [], 0
        for pack, (spec, name) in enumerate(zip(specs, pack_file_names(len(specs)))):
            self.log(f"[export] layers {spec.first_layer}..{spec.last_layer - 1}"
                     f"{' + final norm' if spec.final_norm else ''} -> {name}")
            result = exporter.export_pack(self.source, spec, p.dtype, p.export.batch_dim, self.target / name,
                                          allow_nonfinite=self.allow_nonfinite)
            weight_bytes += result.weight_bytes
            self.log(f"[export] {name}: {result.weight_bytes / 2**20:.1f} MiB of weights in {result.seconds:.1f} s"
                     f"{' (external data)' if result.external_data else ''}, peak RSS {peak_rss_mib():.0f} MiB")
            entries.append(artifact(self.target, self.target / name, pack=pack,
                                    layers=[spec.first_layer, spec.last_layer], final_norm=spec.final_norm,
                                    io=io_contract(cfg, spec, p.export.batch_dim, p.dtype)))
        return {"artifacts": entries, "weight_bytes": weight_bytes}
