from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from kvplan.config import DecoderConfig
from kvplan.errors import ModelError  # noqa: F401  (re-exported: every source raises it from here)
from kvplan.lazy import lazy_import

torch = lazy_import("torch")

# config.json's names for DecoderConfig's sizes (transformers' config classes).
HF_FIELDS = {"hidden_size": "hidden_size", "intermediate_size": "intermediate_size",
             "num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "head_dim": "head_dim",
             "max_position_embeddings": "max_position_embeddings"}


@dataclass(frozen=True)
class ConfigOrigin:
    """Where a source's architecture was read, so that an error a value causes names the file and
    the field as the user wrote them (``DIR/config.json``'s ``num_hidden_layers``), not kvplan's name."""
    file: str
    names: dict[str, str] = field(default_factory=lambda: dict(HF_FIELDS))
    prefix: str = ""            # MiniCPM-o: the fields live in config.json's "tts_config"

    def field(self, name: str) -> str:
        """The file's name for DecoderConfig's field ``name``."""
        return self.prefix + self.names.get(name, name)

    def named(self, name: str) -> str:
        """The file and its field, as an error names them."""
        return f"{self.file}'s {self.field(name)}"


@dataclass
class ModelSource:
    """A decoder's architecture plus a way to read its weights on demand.

    ``read_tensors(names)`` returns the named tensors (Hugging Face names without the
    ``model.`` prefix) and nothing else, so exporting a pack reads only that pack's
    weights.
    """
    name: str
    config: DecoderConfig
    kind: str
    read_tensors: Callable[[list[str]], dict[str, torch.Tensor]]
    # Inputs that identify the weights, for the manifest and incremental builds.
    fingerprint: dict = field(default_factory=dict)
    path: Path | None = None
    # Tensors of the LM head and embeddings, when the source has them (validation):
    # ``read_lm(names=LM_NAMES)``, those of LM_NAMES asked for.
    read_lm: Callable[..., dict[str, torch.Tensor]] | None = None
    # What the independent reference (transformers) is built from, never from kvplan's reading
    # of it: the checkpoint's own config (the directory holding config.json, or for presets
    # and MiniCPM-o's tts_config a config.json dict with its model_type), and the decoder's
    # tensors in the checkpoint's names and layout (fused projections still fused, norm gains
    # unfolded), without the ``model.`` prefix.
    reference_config: Path | dict | None = None
    # ``read_reference(layers=None, norm=True)``: those tensors, of ``layers`` only when given
    # (validation builds the reference a few layers at a time), the final norm when ``norm``.
    read_reference: Callable[..., dict[str, torch.Tensor]] | None = None
    # ``tokenizer()``: the checkpoint's own tokenizer (kvplan.models.tokenizer.Tokenizer), where
    # it ships one; None for presets and checkpoints without one.
    tokenizer: Callable[[], object] | None = None
    # What a build says about how the weights are read (a GGUF file's tensor types), one line each.
    notes: tuple[str, ...] = ()
    # ``read_embedding()``: the input embedding matrix [rows, hidden] whose rows a runtime feeds the
    # decoder as ``hidden_in`` (validation feeds them too), in the checkpoint's values (before a
    # family's scale); ``embedding`` names the tensor. None where the source has no such matrix.
    read_embedding: Callable[[], torch.Tensor] | None = None
    embedding: str | None = None
    # Where ``config`` was read (None: nowhere a user wrote, as for presets).
    origin: ConfigOrigin | None = None
    # ``read_tts()``: MiniCPM-o's TTS audio ends beside its decoder (kvplan.embed_head.tts), as
    # {"emb_code": [num_vq tensors [num_audio_tokens, hidden]], "head_code": [num_vq weight-norm-folded
    # float32 heads [num_audio_tokens, hidden]], "tts_config": {num_vq, num_audio_tokens,
    # num_text_tokens, hidden_size}}; reads only those tensors. None for every other source.
    read_tts: Callable[[], dict] | None = None

    def __post_init__(self) -> None:
        # A source whose LM tensors include the embedding feeds that one, unless it names another.
        if self.read_embedding is None and self.read_lm is not None:
            read_lm = self.read_lm
            self.read_embedding = lambda: read_lm(["embed_tokens.weight"])["embed_tokens.weight"]
            self.embedding = self.embedding or "embed_tokens.weight"


LM_NAMES = ("embed_tokens.weight", "lm_head.weight")


def reference_names(names, layers: range | None = None, norm: bool = True) -> list[str]:
    """The ``names`` of ``layers`` (a layer's tensors, kvplan's and the checkpoints' alike, start
    ``layers.{i}.``) and, when ``norm``, the rest (the final norm); every name when ``layers`` is None."""
    if layers is None:
        return list(names)
    wanted = {f"layers.{i}." for i in layers}
    out = []
    for name in names:
        if name.startswith("layers."):
            if name[:name.index(".", 7) + 1] in wanted:
                out.append(name)
        elif norm:
            out.append(name)
    return out


def file_fingerprint(path: Path) -> dict:
    """Identify a (possibly multi-GB) weight file by size and mtime rather than hashing it."""
    st = path.stat()
    return {"file": path.name, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
