"""The quantize stage: quantize a model source's linears (rtn or awq), or take an imported
checkpoint's (or a GGUF file's) own int4 values, and rewrite the exported graphs with them.

Its digest covers the exported graphs' hashes, the [quantize] settings that apply (an import's
own method and group size), the calibration's digest, kvplan's quantize code and torch's version.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvplan.errors import QuantizeError
from kvplan.lazy import lazy_import, version
from kvplan.manifest import artifact
from kvplan.pipeline import graph_artifacts, peak_rss_mib
from kvplan.quantize import gguf_blocks
from kvplan.quantize.linears import check_groups, weight_name
from kvplan.quantize.settings import NO_INT4_CCS, Quantize
from kvplan.sources import source_digest
from kvplan.stack import pack_file_names

awq = lazy_import("kvplan.quantize.awq")
calibration = lazy_import("kvplan.quantize.calibration")
checkpoint = lazy_import("kvplan.quantize.checkpoint")
graph = lazy_import("kvplan.quantize.graph")
rtn = lazy_import("kvplan.quantize.rtn")
weights_mod = lazy_import("kvplan.quantize.weights")


def quantize_rtn(source, settings: Quantize, log: Callable[[str], None] = print) -> "weights_mod.Quantized":
    """Round to nearest, one layer's tensors read at a time."""
    cfg = source.config
    check_groups(cfg, settings.linears, settings.group_size, source.name)
    out = weights_mod.Quantized(record={"method": "rtn", "group_size": settings.group_size,
                                        "linears": list(settings.linears)})
    t0 = time.perf_counter()
    for layer in range(cfg.num_layers):
        names = [weight_name(layer, linear) for linear in settings.linears]
        for name, w in source.read_tensors(names).items():
            out.linears[name] = rtn.quantize_linear(name, w, settings.group_size)
        log(f"[quantize] rtn: layer {layer + 1}/{cfg.num_layers} ({time.perf_counter() - t0:.1f} s)")
    return out


QUANTIZED_WEIGHTS = "quantized.safetensors"


def _check_int4_ccs(profile, source) -> None:
    blocked = [cc for cc in profile.engine.compute_capabilities if cc in NO_INT4_CCS]
    if blocked:
        raise QuantizeError(f"{profile.source}: engine.compute_capabilities: {', '.join(blocked)} cannot run "
                            f"int4 weight-only layers, and {source.path} is an int4 checkpoint")


def brings_own_int4(source, linears) -> bool:
    """Whether ``source`` holds int4 values of its own (an AutoAWQ/GPTQ checkpoint, a GGUF file's int4
    blocks): they are imported, with their own group size, never quantized again."""
    return getattr(source, "checkpoint", None) is not None or gguf_blocks.has_blocks(source, linears)


def quantize_inputs(source, profile) -> dict | None:
    """What the quantize stage's outputs depend on, or None when the target has no quantize stage."""
    settings = profile.quantize
    imported = getattr(source, "checkpoint", None)
    if imported is not None:
        if settings.enabled:
            raise QuantizeError(f"{profile.source}: quantize.method = {settings.method!r}: {source.path} is already "
                                f"quantized ({imported.method}); its own int4 values are used, never requantized "
                                f"(set method = \"none\")")
        _check_int4_ccs(profile, source)
        return {"method": f"import-{imported.method}", "group_size": imported.group_size, "dtype": profile.dtype}
    if not settings.enabled:
        return None
    if gguf_blocks.has_blocks(source, settings.linears):
        # The file's own int4 blocks (block 32) are imported; the profile's method and group size
        # do not apply (the stage says so), so neither is checked against the model.
        _check_int4_ccs(profile, source)
        return {"method": "import-gguf", "group_size": gguf_blocks.BLOCK, "linears": list(settings.linears),
                "dtype": profile.dtype}
    check_groups(source.config, settings.linears, settings.group_size, profile.source)
    inputs = {"method": settings.method, "bits": settings.bits, "group_size": settings.group_size,
              "linears": list(settings.linears), "dtype": profile.dtype}
    if settings.method == "awq":
        inputs.update(calibration.digest(calibration.resolve(settings.calibration, source), source),
                      samples=settings.samples, tokens=settings.tokens, seed=settings.seed, clip=settings.clip)
    return inputs


def quantize_source(source, settings: Quantize, log: Callable[[str], None] = print) -> "weights_mod.Quantized":
    imported = getattr(source, "checkpoint", None)
    if imported is not None:
        return checkpoint.imported(imported, log)
    if gguf_blocks.has_blocks(source, settings.linears):
        return gguf_blocks.quantized(source, settings, log)
    if settings.method == "rtn":
        return quantize_rtn(source, settings, log)
    return awq.quantize_awq(source, settings, log)


def run_quantize(source, profile, target: Path, graphs: list[tuple[Path, range]], names: list[str],
                 log=print) -> dict:
    """The stage: quantize, write the weights file (what validation's reference dequantizes) and
    each pack's int4 graph. ``graphs``: each pack's exported graph and the layers it holds.

    Every linear quantized must become int4 in exactly one pack's graph (a graph that kept some in
    the profile dtype would be a silently wrong artifact): counted per pack and in all."""
    t0 = time.perf_counter()
    quantized = quantize_source(source, profile.quantize, log)
    seconds = time.perf_counter() - t0
    _check_complete(source, profile.quantize, quantized)
    weights = target / QUANTIZED_WEIGHTS
    quantized.save(weights)
    entries, total = [], 0
    for pack, ((src, layers), name) in enumerate(zip(graphs, names)):
        counts = graph.quantize_graph(src, target / name, quantized, source.read_tensors, layers)
        total += counts["linears"]
        log(f"[quantize] {src.name} -> {name}: {counts['linears']} of {counts['linears_in_graph']} linears int4 "
            f"(layers {layers.start}..{layers.stop - 1}), {counts['replaced']} tensors replaced")
        entries.append(artifact(target, target / name, pack=pack, **counts))
    if total != len(quantized.linears):
        raise QuantizeError(f"{target}: {total} linears became int4 in the graphs, {len(quantized.linears)} were "
                            f"quantized")
    entries.append(artifact(target, weights, role="weights"))
    log(f"[quantize] {quantized.record.get('method')} in {seconds:.1f} s, peak RSS {peak_rss_mib():.0f} MiB")
    return {"artifacts": entries, "seconds": round(seconds, 2), "peak_rss_mib": round(peak_rss_mib()),
            **quantized.record}


def _check_complete(source, settings: Quantize, quantized: "weights_mod.Quantized") -> None:
    """A method that quantizes (rtn, awq) gives every layer's every linear the profile names."""
    if brings_own_int4(source, settings.linears):
        return          # an import: the checkpoint (or GGUF file) says which linears it holds as int4
    cfg = source.config
    wanted = {weight_name(layer, linear) for layer in range(cfg.num_layers) for linear in settings.linears}
    missing = sorted(wanted - set(quantized.linears))
    if missing:
        raise QuantizeError(f"{source.name}: tensor {missing[0]!r}: {settings.method} quantized "
                            f"{len(quantized.linears)} of the {len(wanted)} linears asked for")


@dataclass
class QuantizeStage:
    source: object                   # a kvplan.models.ModelSource
    profile: object                  # a kvplan.profiles.Profile: its [quantize] settings and dtype
    target: Path
    settings: dict                   # quantize_inputs(): what the stage's outputs depend on
    log: Callable[[str], None] = field(default=print, repr=False)
    name: str = "quantize"

    @classmethod
    def of(cls, source, profile, target: Path, log=print) -> "QuantizeStage | None":
        """The stage, or None for a target without one (no int4 profile, no int4 checkpoint)."""
        settings = quantize_inputs(source, profile)
        return None if settings is None else cls(source, profile, target, settings, log)

    def inputs(self, done: dict) -> dict:
        return {"onnx": [a["sha256"] for a in done["export"]["artifacts"]], **self.settings,
                "source": source_digest(__name__), "torch": version("torch")}

    def build(self, done: dict) -> dict:
        graphs = [(self.target / a["path"], range(*a["layers"])) for a in graph_artifacts(done["export"])]
        return run_quantize(self.source, self.profile, self.target, graphs,
                            pack_file_names(len(graphs), suffix=".int4.onnx"), log=self.log)
