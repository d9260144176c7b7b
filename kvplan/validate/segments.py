"""How validation splits a target's stack into the pieces a runner runs in one go.

A multi-pack target (``decoder_pack_size``) is run pack by pack, each pack fed the reference's
hidden state entering it. A single-pack graph is cut into layer ranges (kvplan/validate/ranges.py)
of about RANGE_BYTES of weights (``--layer-ranges auto``, or K ranges): each range after the
first is fed its runner's own hidden_out of the range before, so the ranges compute what the
whole graph does while one range's weights are in memory.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from kvplan.errors import GraphError, UserError
from kvplan.export.exporter import output_names
from kvplan.lazy import lazy_import
from kvplan.models.presets import tensor_shapes
from kvplan.validate import points as pts
from kvplan.validate import ranges, stream
from kvplan.validate import runners as rn

torch = lazy_import("torch")

# Layer ranges hold about this many bytes of weights each (``--layer-ranges auto``): a few times
# one layer of a small model, one layer of a large one.
RANGE_BYTES = 64 << 20


@dataclass(frozen=True)
class Segment:
    """Layers a runner runs in one go: a pack, or a range of a single-pack graph (its own ONNX files)."""
    pack: int
    spec: object                  # StackSpec of its layers
    graphs: dict                  # runner name -> the ONNX file of these layers

    @property
    def layers(self) -> range:
        return range(self.spec.first_layer, self.spec.last_layer)

    def label(self, cut: bool) -> str:
        return f"layers {self.spec.first_layer}..{self.spec.last_layer - 1}" if cut else f"pack{self.pack}"


def layer_bytes(cfg, dtype: torch.dtype) -> int:
    """One layer's weights in ``dtype``."""
    shapes = tensor_shapes(cfg)
    return sum(math.prod(v) for k, v in shapes.items() if k.startswith("layers.0.")) * torch.finfo(dtype).bits // 8


def range_count(option, cfg, specs, dtype) -> int:
    """How many layer ranges a single-pack target is validated in (1: the whole stack at once)."""
    if option == "auto":
        if len(specs) != 1:
            return 1          # packs are validated pack by pack already
        per_range = max(1, RANGE_BYTES // max(1, layer_bytes(cfg, dtype)))
        return min(cfg.num_layers, math.ceil(cfg.num_layers / per_range))
    if option <= 1:
        return 1
    if len(specs) != 1:
        raise UserError(f"--layer-ranges: this target is already cut into {len(specs)} packs "
                        f"(decoder_pack_size); they are validated pack by pack without it")
    return option


def cut(count, cfg, pack, exported, fused, directory: Path, explicit: bool, log) -> list[Segment]:
    """The single-pack graphs cut into ``count`` layer ranges in ``directory``; [] when ``auto``
    meets a graph that cannot be cut (validated whole, as the log says)."""
    try:
        rspecs = ranges.range_specs(pack, count)
    except ValueError as e:
        raise UserError(str(e)) from None
    directory.mkdir(parents=True, exist_ok=True)
    graphs = [{} for _ in rspecs]
    for name, path in zip(rn.GRAPH_RUNNERS, (exported, fused)):
        if path is None:
            continue
        try:
            written = ranges.write_ranges(path, rspecs, cfg.num_layers, directory, path.name.removesuffix(".onnx"))
        except GraphError as e:
            if explicit:
                raise
            log(f"[validate] validated whole, not in layer ranges: {e}")
            return []
        for g, p in zip(graphs, written):
            g[name] = p
        log(f"[validate] {path.name} cut into layer ranges " + ", ".join(f"{s.first_layer}..{s.last_layer - 1}" for s in rspecs))
    return [Segment(0, s, g) for s, g in zip(rspecs, graphs)]


def segment_jobs(s_index, seg, segments, specs, stems, profile, data, cfg) -> list:
    """One job per optimization profile for the runners of ``seg``: a range after the first of its pack
    is fed the runner's own hidden_out of the range before (so the ranges compute what the whole
    graph does); a pack's first range, the reference's hidden state entering the pack."""
    pack_spec = specs[seg.pack]
    siblings = [x for x in segments if x.pack == seg.pack]
    own = seg.spec.first_layer != pack_spec.first_layer
    whole = len(siblings) == 1

    def feed_of(d, runner, spec=seg.spec):
        return pts.feed_for(d, spec, d.entering(spec.first_layer, runner if own else rn.REFERENCE))

    def pack_feed(d, spec=pack_spec):       # for the pack's inputs file: one tensor at a time
        return pts.lazy_feed(d, spec, d.entering(spec.first_layer, rn.REFERENCE))

    return [stream.Job(s_index, f"{stems[seg.pack]}.{name}", group, feed_of, segment=siblings.index(seg),
                       ranges=len(siblings),
                       next_layer=seg.spec.last_layer if seg.spec.last_layer < cfg.num_layers else None,
                       pack_outputs=None if whole else output_names(pack_spec), pack_feed=None if whole else pack_feed)
            for name, group in _groups(profile, data)]


def pack_jobs(p_index, spec, segments, stems, profile, data) -> list:
    """Whole-pack jobs (TensorRT runs the pack's engine), fed the reference's hidden state entering it."""
    first = next(i for i, seg in enumerate(segments) if seg.pack == p_index)

    def feed_of(d, runner, spec=spec):
        return pts.feed_for(d, spec, d.entering(spec.first_layer, rn.REFERENCE))

    return [stream.Job(first, f"{stems[p_index]}.{name}", group, feed_of) for name, group in _groups(profile, data)]


def _groups(profile, data) -> list[tuple[str, list]]:
    """(optimization profile name, its points' data) for each profile that has points."""
    return [(sp.name, group) for index, sp in enumerate(profile.shapes)
            if (group := [d for d in data if d.point.profile_index == index])]
