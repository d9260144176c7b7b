"""A GGUF file (llama.cpp's format) as a model source: ``--model path/to/model.gguf``.

Read with the ``gguf`` package, memory-mapped: a tensor is read (and dequantized) only when asked for.

- Architecture: ``general.architecture`` ``llama``, ``qwen2``, ``qwen3``, ``gemma2`` or ``phi3`` is
  that family. The ``{arch}.*`` metadata is mapped onto the config.json fields the family reads, so
  the family's own checks (and refusals) apply unchanged; any other architecture is refused.
- Tensors: GGUF's names (``blk.{i}.attn_q.weight``) map onto the checkpoint names the family reads
  (``layers.{i}.self_attn.q_proj.weight``; Phi-3's fused ``attn_qkv``/``ffn_up`` onto its fused
  projections). A tensor that maps onto nothing is refused rather than dropped (llama3 or LongRoPE
  frequency factors, ``rope_freqs``/``rope_factors_*``, change the rotary and are not supported).
- llama.cpp permutes the rows of ``attn_q``/``attn_k`` (weights and biases) of architecture llama
  for its rotary layout (``convert_hf_to_gguf.py``'s ``permute``); the rows are put back when read.
  llama.cpp stores Gemma 2's norm gains as 1 + w; the checkpoint's w is that minus 1.
- Types: float (F32, F16, BF16) and every block type the ``gguf`` package dequantizes; read as
  float32 (``gguf.quants.dequantize``). An int4 profile imports Q4_0/Q4_1/Q4_K blocks as they are
  (kvplan.quantize.gguf_blocks). Integer tensors and types without a dequantizer are refused.
- The independent reference is transformers' own reading of the file: its config conversion
  (``load_gguf_checkpoint``) and, tensor by tensor, its name map and tensor processor (which
  undoes the permutation itself), never kvplan's.
- The tokenizer is transformers' reading of the file's ``tokenizer.*`` metadata.
"""
from __future__ import annotations

import collections
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kvplan.config import DecoderConfig
from kvplan.errors import ConfigError, ModelError
from kvplan.lazy import lazy_import
from kvplan.models import families, sizes
from kvplan.models.base import LM_NAMES, ConfigOrigin, ModelSource, file_fingerprint, reference_names
from kvplan.models.presets import tensor_shapes
from kvplan.models.tokenizer import load_tokenizer

gguf = lazy_import("gguf")
torch = lazy_import("torch")

T = gguf.GGMLQuantizationType
MAGIC = b"GGUF"
ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2", "phi3")
FLOAT_TYPES = (T.F32, T.F16, T.BF16)
INTEGER_TYPES = (T.I8, T.I16, T.I32, T.I64)

# Checkpoint name (without ``layers.{i}.`` and ``.weight``/``.bias``) -> GGUF name in ``blk.{i}``.
LAYER_TENSORS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}
# Gemma 2's sandwich norms have their own GGUF names.
GEMMA2_LAYER_TENSORS = {"post_attention_layernorm": "post_attention_norm",
                        "pre_feedforward_layernorm": "ffn_norm", "post_feedforward_layernorm": "post_ffw_norm"}
TOP_TENSORS = {"embed_tokens.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}


# The ``{arch}.*`` metadata keys DecoderConfig's sizes are read from (hf_config), for errors.
METADATA_FIELDS = {"hidden_size": "embedding_length", "intermediate_size": "feed_forward_length",
                   "num_layers": "block_count", "num_heads": "attention.head_count",
                   "num_kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length",
                   "max_position_embeddings": "context_length"}


def accepts(arg: str) -> bool:
    path = Path(arg)
    if path.suffix.lower() == ".gguf":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


def _open(path: Path) -> gguf.GGUFReader:
    if not path.is_file():
        raise ModelError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, UnicodeDecodeError) as e:
        # The reader maps the file and cuts every field and tensor out of it: a short file fails
        # as a reshape or an out-of-range read.
        raise ModelError(f"{path}: not a readable GGUF file, truncated or corrupt ({type(e).__name__}: {e})") from None


class Metadata:
    """Typed reads of a GGUF file's key-value metadata; every error names the file and the key."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self.fields, self.path = reader.fields, path

    def get(self, key: str, default=None):
        f = self.fields.get(key)
        return default if f is None else f.contents()

    def int(self, key: str, default: int | None = None) -> int | None:
        value = self.get(key, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]          # a per-layer array that is the same on every layer
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ModelError(f"{self.path}: metadata {key}: expected an integer, got {value!r}")
        return value

    def float(self, key: str, default: float | None = None) -> float | None:
        value = self.get(key, default)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ModelError(f"{self.path}: metadata {key}: expected a number, got {value!r}")
        return None if value is None else float(value)

    def required(self, key: str) -> int:
        value = self.int(key)
        if value is None:
            raise ModelError(f"{self.path}: metadata {key} is missing")
        return value


def hf_config(meta: Metadata, arch: str, tensors: Mapping[str, object]) -> dict:
    """The config.json fields of ``arch``'s family, from the file's ``{arch}.*`` metadata."""
    key = f"{arch}.{{}}".format
    hidden, heads = meta.required(key("embedding_length")), meta.required(key("attention.head_count"))
    # llama.cpp's reading: the head size defaults to n_embd / n_head, the rotary part to all of it.
    head_dim = meta.int(key("attention.key_length")) or (hidden // heads if heads > 0 else 0)
    rotary = meta.int(key("rope.dimension_count"), head_dim)
    vocab = meta.int(key("vocab_size")) or len(meta.get("tokenizer.ggml.tokens", []))
    if not vocab and "token_embd.weight" in tensors:
        vocab = int(tensors["token_embd.weight"].shape[1])
    hf = {"model_type": arch, "hidden_size": hidden,
          "intermediate_size": meta.required(key("feed_forward_length")),
          "num_hidden_layers": meta.required(key("block_count")), "num_attention_heads": heads,
          "num_key_value_heads": meta.int(key("attention.head_count_kv"), heads), "head_dim": head_dim,
          "rms_norm_eps": meta.float(key("attention.layer_norm_rms_epsilon"), 1e-5),
          "rope_theta": meta.float(key("rope.freq_base"), 10000.0),
          "max_position_embeddings": meta.required(key("context_length")), "vocab_size": vocab,
          "tie_word_embeddings": "output.weight" not in tensors,
          # llama.cpp's llama and qwen3 have a bias on q, k, v and o when the file holds one.
          "attention_bias": "blk.0.attn_q.bias" in tensors, "mlp_bias": "blk.0.ffn_up.bias" in tensors}
    if rotary != head_dim:
        hf["partial_rotary_factor"] = rotary / head_dim
    scaling = meta.get(key("rope.scaling.type"), "none")
    if scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": meta.float(key("rope.scaling.factor"))}
    elif scaling != "none":
        raise ModelError(f"{meta.path}: metadata {key('rope.scaling.type')} {scaling!r} is not supported "
                         f"(none, linear)")
    window = meta.int(key("attention.sliding_window"))
    if window is not None:
        hf["sliding_window"] = window
    if arch == "gemma2":
        # Not in the metadata: llama.cpp scales Gemma 2's queries by n_embd / n_head for its 46-layer
        # 27B and by the head size otherwise (llama-model.cpp), which is query_pre_attn_scalar.
        hf["query_pre_attn_scalar"] = hidden // heads if hf["num_hidden_layers"] == 46 else head_dim
        for name in ("attn_logit_softcapping", "final_logit_softcapping"):
            if meta.get(key(name)) is not None:
                hf[name] = meta.float(key(name))
    return hf


def gguf_name(arch: str, name: str) -> str:
    """The GGUF tensor a checkpoint tensor (no ``model.`` prefix) is stored as."""
    if name in TOP_TENSORS:
        return TOP_TENSORS[name]
    _, layer, rest = name.split(".", 2)
    base, suffix = rest.rsplit(".", 1)
    table = {**LAYER_TENSORS, **GEMMA2_LAYER_TENSORS} if arch == "gemma2" else LAYER_TENSORS
    return f"blk.{layer}.{table[base]}.{suffix}"


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permute: it stores checkpoint row h·D + s·D/2 + j of
    head h (half s of the rotary pairs, j < D/2) as row h·D + 2j + s."""
    half = rows // heads // 2
    return torch.arange(rows).reshape(heads, half, 2).transpose(1, 2).reshape(-1)


@dataclass
class GGUFFile:
    """The opened file: its tensors by GGUF name, and how to read them in the checkpoint's layout."""
    path: Path
    arch: str
    cfg: DecoderConfig
    tensors: dict[str, object]              # GGUF name -> gguf.ReaderTensor

    def tensor(self, name: str):
        """The ReaderTensor of checkpoint tensor ``name``."""
        return self.tensors[gguf_name(self.arch, name)]

    def rows(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """``t``, any per-row array of checkpoint tensor ``name`` in the file's row order (values,
        block scales), with its rows in the checkpoint's order."""
        if self.arch != "llama":
            return t
        if ".self_attn.q_proj." in name:
            return t[unpermute_rows(t.shape[0], self.cfg.num_heads)]
        if ".self_attn.k_proj." in name:
            return t[unpermute_rows(t.shape[0], self.cfg.num_kv_heads)]
        return t

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (float32, the checkpoint's layout) dequantized from the file."""
        out = {}
        for name in names:
            t = self.tensor(name)
            values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
            values = self.rows(name, values)
            if self.arch == "gemma2" and name.endswith("norm.weight"):
                values = values - 1.0
            out[name] = values
        return out


@dataclass
class GGUFSource(ModelSource):
    """A ModelSource over a GGUF file, with the file for the quantize stage's int4 block import."""
    gguf: GGUFFile | None = None


def _check_types(path: Path, tensors: dict[str, object], used: set[str]) -> None:
    dequantizable = set()
    for name in sorted(used):
        t = tensors[name]
        kind = t.tensor_type
        if kind in INTEGER_TYPES:
            raise ModelError(f"{path}: tensor {name!r}: type {kind.name} is an integer type, not weights")
        if kind not in FLOAT_TYPES and kind not in dequantizable:
            _, size = gguf.GGML_QUANT_SIZES[kind]
            try:
                gguf.quants.dequantize(np.zeros((1, size), dtype=np.uint8), kind)
                dequantizable.add(kind)
            except NotImplementedError:
                raise ModelError(f"{path}: tensor {name!r}: type {kind.name} is not supported (the gguf package "
                                 f"has no dequantization for it)") from None


class _TransformersConfig(Mapping):
    """transformers' own config conversion of the file (``load_gguf_checkpoint``), made on first use:
    only validation needs it, and it imports transformers and reads the metadata again."""

    def __init__(self, path: Path):
        self.path, self._d = path, None

    def _get(self) -> dict:
        if self._d is None:
            from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint  # heavy; validation only
            self._d = load_gguf_checkpoint(str(self.path), return_tensors=False)["config"]
        return self._d

    def __getitem__(self, key):
        return self._get()[key]

    def __iter__(self):
        return iter(self._get())

    def __len__(self):
        return len(self._get())


class TransformersReading:
    """Tensors as transformers' GGUF loader converts them (its name map and tensor processor, tensor
    by tensor, as ``load_gguf_checkpoint`` does for the whole file): the reference's weights."""

    def __init__(self, reader: gguf.GGUFReader, family: str, config: Mapping):
        self.reader, self.family, self.config = reader, family, config
        self._names = None

    def names(self) -> dict[str, object]:
        """Checkpoint name (no ``model.`` prefix) -> ReaderTensor, for every decoder tensor."""
        if self._names is None:
            import transformers  # heavy; only the reference needs it
            from transformers.modeling_gguf_pytorch_utils import (  # as above
                TENSOR_PROCESSORS,
                TensorProcessor,
                get_gguf_hf_weights_map,
            )
            config = dict(self.config)
            lm_class = families.get(self.family).reference_classes[1]
            hf = transformers.AutoConfig.for_model(config.pop("model_type"), **config)
            with torch.device("meta"):
                model = getattr(transformers, lm_class)(hf)
            arch = self.reader.fields["general.architecture"].contents()
            self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=dict(self.config))
            mapping = get_gguf_hf_weights_map(model, self.processor)
            by_gguf = {t.name: t for t in self.reader.tensors}
            self._names = {hf_name.removeprefix("model."): by_gguf[g] for g, hf_name in mapping.items()
                           if g in by_gguf and hf_name.startswith("model.")}
        return self._names

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        tensors = self.names()
        for name in names:
            t = tensors[name]
            weights = gguf.quants.dequantize(t.data, t.tensor_type)
            weights = self.processor.process(weights=weights, name=t.name, tensor_key_mapping={},
                                             parsed_parameters={}).weights
            out[name] = torch.from_numpy(np.copy(weights))
        return out


def load(arg: str) -> GGUFSource:
    path = Path(arg)
    reader = _open(path)
    meta = Metadata(reader, path)
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ModelError(f"{path}: general.architecture {arch!r} is not supported (supported: "
                         f"{', '.join(ARCHITECTURES)})")
    tensors = {t.name: t for t in reader.tensors}
    try:
        cfg = families.from_hf_dict(hf_config(meta, arch, tensors), str(path))
    except ConfigError as e:
        raise ModelError(str(e)) from None
    family = families.get(cfg.family)
    origin = ConfigOrigin(str(path), {k: f"{arch}.{v}" for k, v in METADATA_FIELDS.items()})

    def held(name: str, expected: tuple[int, ...]) -> sizes.Held:
        g = gguf_name(arch, name)
        # GGUF lists a tensor's dimensions innermost first: [in, out] for a linear's [out, in].
        shape = tuple(int(d) for d in reversed(tensors[g].shape)) if g in tensors else None
        return sizes.Held(str(path), g, shape, expected, also=f" (the checkpoint's {name})")
    # Sizes against the tensor infos before anything is built: tensor_shapes below builds (on the
    # meta device) as many layers as block_count says.
    sizes.check(cfg, family, origin, held)
    checkpoint_names = sorted({family.checkpoint_name(cfg, n) for n in tensor_shapes(cfg)})
    lm = {"embed_tokens.weight": "embed_tokens.weight",
          "lm_head.weight": "embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"}
    wanted = {gguf_name(arch, n): n for n in checkpoint_names + sorted(set(lm.values()))}
    for g, n in wanted.items():
        if g not in tensors:
            raise ModelError(f"{path}: tensor {g!r} (the checkpoint's {n}) is missing from the file")
    extra = sorted(set(tensors) - set(wanted))
    if extra:
        why = " (rotary frequency factors: llama3 or LongRoPE scaling is not supported)" \
            if extra[0].startswith("rope_") else ""
        raise ModelError(f"{path}: tensor {extra[0]!r} has no counterpart in kvplan's {arch} decoder{why}")
    _check_types(path, tensors, set(wanted))
    file = GGUFFile(path, arch, cfg, tensors)
    read = families.reader(family, cfg, file.read)

    def read_lm(names=LM_NAMES):
        got = file.read(sorted({lm[k] for k in names}))
        return {k: got[lm[k]] for k in names}

    types = collections.Counter(file.tensor(n).tensor_type.name for n in checkpoint_names)
    reference_config = _TransformersConfig(path)
    reference = TransformersReading(reader, cfg.family, reference_config)
    source = GGUFSource(
        name=path.stem, config=cfg, kind="gguf", read_tensors=read,
        fingerprint={"kind": "gguf", **file_fingerprint(path), "tensor_types": dict(sorted(types.items()))},
        path=path, read_lm=read_lm, reference_config=reference_config,
        read_reference=lambda layers=None, norm=True: reference.read(
            reference_names(checkpoint_names, layers, norm)),
        tokenizer=lambda: load_tokenizer(path.parent, gguf_file=path.name), gguf=file, origin=origin,
        notes=(f"{path.name}: decoder tensors {', '.join(f'{k} x{v}' for k, v in sorted(types.items()))}, read "
               f"dequantized into the profile dtype (an int4 profile imports the Q4_0/Q4_1/Q4_K blocks instead)",))
    return source
