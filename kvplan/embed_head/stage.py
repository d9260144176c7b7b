"""The embed_head stage: embed.onnx and head.onnx beside the decoder, where the model has an
embedding and an LM head (MiniCPM-o's TTS: its text embedding, audio embeddings and audio heads).

Its digest covers the model's files and config, the profile's dtype, batch axis and [head]
section (with the int4 group size where the head is int4), and kvplan's code for these graphs.
The decoder's graphs are not among its inputs: a new surgery pass leaves these graphs alone.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kvplan.errors import ProfileError
from kvplan.lazy import lazy_import, version
from kvplan.manifest import artifact
from kvplan.models import families
from kvplan.pipeline import collections_skip_what_exists, release_memory
from kvplan.sources import source_digest

graphs_mod = lazy_import("kvplan.embed_head.graphs")
tts_graphs = lazy_import("kvplan.embed_head.tts")
quantize_graph = lazy_import("kvplan.quantize.graph")

MODULE = "kvplan.embed_head.stage"
# TensorRT's TopK takes k up to this (ITopKLayer).
TOPK_MAX = 3840


def has_graphs(source) -> bool:
    """Whether the source holds an embedding and an LM head (or MiniCPM-o's audio ends) to build from."""
    return source.read_lm is not None or source.read_tts is not None


@dataclass
class EmbedHeadStage:
    source: object                   # a kvplan.models.ModelSource with read_lm
    profile: object                  # a kvplan.profiles.Profile
    target: Path
    log: Callable[[str], None] = field(default=print, repr=False)
    name: str = "embed_head"

    @property
    def int4_group(self) -> int:
        """The int4 head's group: the [quantize] group size, halved until it divides hidden_size
        (as the decoder's linears are fitted), never below 32."""
        if self.profile.head.weights != "int4":
            return 0
        hidden, group = self.source.config.hidden_size, self.profile.quantize.group_size
        while hidden % group and group > 32:
            group //= 2
        if hidden % group:
            raise ProfileError(f"{self.profile.source}: head.weights = \"int4\": no group size of 32 or more "
                               f"divides hidden_size {hidden}")
        return group

    def inputs(self, _done: dict) -> dict:
        p = self.profile
        return {"model": self.source.fingerprint, "config": self.source.config.to_dict(), "dtype": p.dtype,
                "batch": p.export.batch_dim, "head": asdict(p.head), "int4_group": self.int4_group,
                "source": source_digest(MODULE), "onnx_ir": version("onnx-ir")}

    def graphs(self):
        """The graphs one at a time: each is saved and dropped before the next one's weights are
        read (a 152k-row vocabulary is 260 MiB a matrix in fp16, more as the source holds it)."""
        p = self.profile
        if self.source.read_lm is not None:
            yield from self.text_graphs()
        if self.source.read_tts is not None:
            if self.source.read_lm is None and self.source.read_embedding is not None:
                yield graphs_mod.embed_graph(self.source.read_embedding(), 1.0, p.dtype, p.export.batch_dim)
            tts = self.source.read_tts()
            yield tts_graphs.audio_embed_graph(tts.pop("emb_code"), p.dtype, p.export.batch_dim)
            yield tts_graphs.audio_head_graph(tts.pop("head_code"), p.dtype, p.export.batch_dim,
                                              last_only=p.head.last_only)

    def _check_top_k(self, vocab: int) -> None:
        top_k = self.profile.head.top_k
        if top_k > min(vocab, TOPK_MAX):
            raise ProfileError(f"{self.profile.source}: head.top_k {top_k} exceeds "
                               + (f"the vocabulary's {vocab} rows" if top_k > vocab
                                  else f"TensorRT's TopK limit of {TOPK_MAX}"))

    def text_graphs(self):
        cfg, p = self.source.config, self.profile
        self._check_top_k(cfg.vocab_size)           # before any graph is written
        scale = families.get(cfg.family).embedding_scale(cfg)
        # The matrix is read in the call: no reference outlives its graph's making.
        yield graphs_mod.embed_graph(self.source.read_embedding(), scale, p.dtype, p.export.batch_dim)
        yield self._head_graph()

    def _head_graph(self):
        cfg, p = self.source.config, self.profile
        weight = self.source.read_lm(["lm_head.weight"])["lm_head.weight"]
        self._check_top_k(weight.shape[0])          # the head's own rows, where they differ from the config's
        return graphs_mod.head_graph(weight, p.dtype, p.export.batch_dim, softcap=cfg.logit_softcap,
                                     last_only=p.head.last_only, top_k=p.head.top_k, int4_group=self.int4_group)

    def build(self, _done: dict) -> dict:
        entries = []
        # An ONNX IR graph is a web of reference cycles (nodes and values): each needs a collection
        # to go, which skips the libraries' objects from before the stage.
        with collections_skip_what_exists():
            for graph in self.graphs():
                path = self.target / f"{graph.name}.onnx"
                quantize_graph.save(graph.model, path)
                self.log(f"[embed_head] {path.name}: {graph.weight_bytes / 2**20:.1f} MiB of weights, "
                         f"{' '.join(graph.contract['inputs'])} -> {' '.join(graph.contract['outputs'])}")
                entries.append(artifact(self.target, path, graph=graph.name, io=graph.contract,
                                        weight_bytes=graph.weight_bytes,
                                        **({"int4_group": self.int4_group} if graph.name == "head" else {})))
                del graph                   # and its weights, before the next graph's are read
                release_memory()
        return {"artifacts": entries}


def end_graphs(record: dict | None) -> dict[str, dict]:
    """The stage's artifacts by graph name (``embed``, ``head``, ...); none where it did not run."""
    return {a["graph"]: a for a in (record or {}).get("artifacts", []) if "graph" in a}
