"""A pre-quantized checkpoint directory as a model source, detected from config.json's
``quantization_config``: its linears read as their int4 values dequantized (what the export binds),
and the quantize stage imports the int4 values themselves (kvplan.quantize.checkpoint), never
requantizing them.

AutoAWQ "gemm" (``quant_method = "awq"``, ``version = "gemm"``), per linear:
  ``qweight`` int32 [in, out/8], ``qzeros`` int32 [in/G, out/8], ``scales`` fp16 [in/G, out];
  nibble i (bits 4i..4i+3) of word j holds output channel 8j + AWQ_ORDER[i]; values unsigned,
  W^T[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n].
GPTQ (``quant_method = "gptq"``), per linear:
  ``qweight`` int32 [in/8, out], nibble i of word j holding input row 8j + i; ``qzeros`` int32
  [in/G, out/8], nibble i of word j holding output channel 8j + i; ``scales`` fp16 [in/G, out];
  ``g_idx`` int32 [in], each input row's group. W^T[k, n] = (q[k, n] - z[g_idx[k], n]) * s[g_idx[k], n]
  where, in the original ("gptq", v1) checkpoint format, z is the stored zero plus one
  (AutoGPTQ stores zeros - 1); ``checkpoint_format = "gptq_v2"`` stores z itself.
  ``desc_act`` (a g_idx that is not k // G): the rows are sorted by group, and the graph gathers
  x's channels in that order (QuantLinear.perm).

Zero points are kept exactly, never clamped: TensorRT takes only symmetric int4, so the graph
stores q - 8 (always in [-8, 7]) as INT4 and adds the rest of the zero point as a per-group term,
(q - z)·s = (q - 8)·s + (8 - z)·s, i.e. y = x @ DQ(q - 8, s) + (x summed per group) @ ((8 - z)·s)
(kvplan.quantize.graph). This is W exactly (the only rounding is the graph dtype's, as for
any weight), costs one [tokens, in/G] x [in/G, out] MatMul per linear, and both TensorRT-RTX
and ONNX Runtime run it; a symmetric checkpoint (every z = 8) has no such term.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from kvplan.config import LINEAR_MODULES, ConfigError
from kvplan.errors import QuantizeError
from kvplan.lazy import lazy_import
from kvplan.models import families, sizes
from kvplan.models.base import LM_NAMES, ConfigOrigin, ModelSource, reference_names
from kvplan.models.families import from_hf_dict
from kvplan.models.hf_dir import held as hf_held
from kvplan.models.int4 import QuantLinear
from kvplan.models.presets import tensor_shapes
from kvplan.models.safetensors_dir import TensorIndex
from kvplan.models.tokenizer import has_tokenizer, load_tokenizer

torch = lazy_import("torch")

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
PREFIX = "model."


def _nibbles(words: torch.Tensor) -> torch.Tensor:
    """int32 [..., W] -> [..., W, 8] unsigned 4-bit values, nibble i = bits 4i..4i+3."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    return (words.to(torch.int32).unsqueeze(-1) >> shifts) & 0xF


def unpack_awq(words: torch.Tensor) -> torch.Tensor:
    """AutoAWQ gemm packing along the last axis: [rows, out/8] int32 -> [rows, out] int."""
    rows, packed = words.shape
    nib = _nibbles(words)                                   # [rows, out/8, 8]
    out = torch.empty(rows, packed, 8, dtype=torch.int32)
    out[:, :, list(AWQ_ORDER)] = nib
    return out.reshape(rows, packed * 8)


def unpack_sequential(words: torch.Tensor, axis: int) -> torch.Tensor:
    """GPTQ packing: nibble i of word j is element 8j + i along ``axis`` (0: rows, 1: columns)."""
    if axis == 1:
        rows, packed = words.shape
        return _nibbles(words).reshape(rows, packed * 8)
    packed, cols = words.shape
    return _nibbles(words.t()).reshape(cols, packed * 8).t().contiguous()


@dataclass
class Checkpoint:
    """What a pre-quantized checkpoint holds beyond a plain one, and how to read it."""
    directory: Path
    method: str                 # awq | gptq
    group_size: int
    config: dict                # its quantization_config
    index: TensorIndex
    cfg: object                 # DecoderConfig
    quantized_names: tuple[str, ...]   # tensor names (no prefix) of the quantized linears' weights

    def _fail(self, name: str, msg: str) -> QuantizeError:
        return QuantizeError(f"{self.directory}: tensor {PREFIX + name!r}: {msg}")

    def linear(self, name: str) -> QuantLinear:
        """The int4 form of linear ``name`` (``layers.0.self_attn.q_proj.weight``), checked."""
        base = name.removesuffix(".weight")
        parts = ["qweight", "qzeros", "scales"] + (["g_idx"] if self.method == "gptq" else [])
        got = self.index.read([f"{PREFIX}{base}.{p}" for p in parts])
        t = {p: got[f"{PREFIX}{base}.{p}"] for p in parts}
        out_f, in_f = self.shape(name)
        g = self.group_size
        groups = in_f // g
        qw_shape = (in_f, out_f // 8) if self.method == "awq" else (in_f // 8, out_f)
        expect = {"qweight": qw_shape, "qzeros": (groups, out_f // 8), "scales": (groups, out_f)}
        if self.method == "gptq":
            expect["g_idx"] = (in_f,)
        for p, shape in expect.items():
            if tuple(t[p].shape) != shape:
                raise self._fail(f"{base}.{p}", f"shape {list(t[p].shape)}, expected {list(shape)} "
                                               f"(in {in_f}, out {out_f}, group_size {g})")
        scales = t["scales"].to(torch.float32)
        if self.method == "awq":
            q = unpack_awq(t["qweight"])
            zeros = unpack_awq(t["qzeros"])
            perm = None
        else:
            q = unpack_sequential(t["qweight"], axis=0)
            zeros = unpack_sequential(t["qzeros"], axis=1)
            if self.config.get("checkpoint_format", "gptq") != "gptq_v2":
                zeros = zeros + 1
            g_idx = t["g_idx"].to(torch.int64)
            perm = self._perm(f"{base}.g_idx", g_idx)
            if perm is not None:
                q = q[perm]
        correction = None
        if not bool((zeros == 8).all()):
            correction = (8 - zeros).to(torch.float32) * scales
        return QuantLinear((q - 8).to(torch.int8), scales, g, correction, perm)

    def _perm(self, name: str, g_idx: torch.Tensor) -> torch.Tensor | None:
        in_f = g_idx.shape[0]
        natural = torch.arange(in_f) // self.group_size
        if torch.equal(g_idx, natural):
            return None
        perm = torch.argsort(g_idx, stable=True)
        if not torch.equal(g_idx[perm], natural):
            raise self._fail(name, f"g_idx does not put exactly group_size {self.group_size} input rows in each "
                                   f"group, so the rows cannot be regrouped for blocked int4")
        return perm

    def shape(self, name: str) -> tuple[int, int]:
        return tensor_shapes(self.cfg)[name]


@dataclass
class QuantizedSource(ModelSource):
    """A ModelSource whose linears read as the checkpoint's dequantized weights (what the export binds
    and the int4 rewrite finds), with the checkpoint itself for the quantize stage."""
    checkpoint: Checkpoint | None = None


def quantization_config(directory: Path) -> dict | None:
    path = directory / "config.json"
    if not path.is_file():
        return None
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None             # kvplan.models reports the bad JSON
    # Nor is anything but an object a checkpoint's config: kvplan.models says so, naming the file.
    return config.get("quantization_config") if isinstance(config, dict) else None


def _check_config(config_file: Path, qc: dict) -> tuple[str, int]:
    def fail(field: str, msg: str) -> QuantizeError:
        return QuantizeError(f"{config_file}: quantization_config.{field}: {msg}")
    if not isinstance(qc, dict):
        raise QuantizeError(f"{config_file}: quantization_config must be an object")
    method = qc.get("quant_method")
    if method not in ("awq", "gptq"):
        raise fail("quant_method", f"{method!r} is not supported (awq with version gemm, or gptq)")
    bits = qc.get("bits", qc.get("w_bit"))
    if bits != 4:
        raise fail("bits", f"{bits!r} bits are not supported (int4 only)")
    group = qc.get("group_size", qc.get("q_group_size"))
    if group not in (32, 64, 128):
        raise fail("group_size", f"{group!r} is not supported (32, 64 or 128; -1, one group per row, is not "
                                 f"a blocked int4 form TensorRT builds)")
    if method == "awq" and str(qc.get("version", "gemm")).lower() != "gemm":
        raise fail("version", f"{qc.get('version')!r}: only AutoAWQ's gemm packing is supported")
    if method == "gptq" and qc.get("checkpoint_format", "gptq") not in ("gptq", "gptq_v2"):
        raise fail("checkpoint_format", f"{qc.get('checkpoint_format')!r} is not supported (gptq, gptq_v2)")
    return method, group


# What each part of a packed linear must be stored as (safetensors' dtype names): the packed
# values and zeros are int32 words, the scales floats, GPTQ's g_idx group numbers.
PART_DTYPES = {"qweight": ("I32",), "qzeros": ("I32",), "scales": ("F16", "BF16", "F32"),
               "g_idx": ("I32", "I64", "I16", "I8", "U8")}
PART_MEANING = {"qweight": "int32 (8 packed 4-bit values)", "qzeros": "int32 (8 packed 4-bit zero points)",
                "scales": "a float dtype (float16, bfloat16 or float32)",
                "g_idx": "an integer dtype (each input row's group number)"}


def _check_dtype(index: TensorIndex, name: str, part: str, method: str) -> None:
    """A part stored in another dtype would be reinterpreted or cast into wrong weights; refused."""
    dtype = index.header(name)[1]
    if dtype not in PART_DTYPES[part]:
        raise QuantizeError(f"{index.where[name]}: tensor {name!r}: dtype {dtype}; {method.upper()} {part} must be "
                            f"{PART_MEANING[part]}")


def accepts(arg: str) -> bool:
    return quantization_config(Path(arg)) is not None


def _packed_linears(directory: Path, index: TensorIndex, shapes: dict, method: str, suffixes: tuple[str, ...]
                    ) -> list[str]:
    """The linears the checkpoint holds packed (those with a qweight), each with every part it needs
    stored in the dtype its format says."""
    names = []
    parts = ("qweight", "qzeros", "scales") + (("g_idx",) if method == "gptq" else ())
    for name in shapes:
        base = PREFIX + name.removesuffix(".weight")
        if not (name.endswith(suffixes) and base + ".qweight" in index.where):
            continue
        names.append(name)
        for part in parts:
            if base + "." + part not in index.where:
                raise QuantizeError(f"{directory}: tensor {base + '.' + part!r} is missing from the checkpoint")
            _check_dtype(index, base + "." + part, part, method)
    return names


def load(arg: str) -> QuantizedSource:
    directory = Path(arg)
    qc = quantization_config(directory)
    config_file = directory / "config.json"
    method, group = _check_config(config_file, qc)
    cfg_dict = json.loads(config_file.read_text())
    try:
        cfg = from_hf_dict(cfg_dict, str(config_file))
    except ConfigError as e:
        raise QuantizeError(str(e)) from None
    index = TensorIndex(directory)
    linear_suffixes = tuple(f".{m}.weight" for m in LINEAR_MODULES.values())

    def held(name: str, expected: tuple[int, ...]) -> sizes.Held:
        """A quantized linear as the [out, in] its qweight packs; any other tensor as it is."""
        qweight = PREFIX + name.removesuffix(".weight") + ".qweight"
        if not name.endswith(linear_suffixes) or qweight not in index.where:
            got = hf_held(index, PREFIX + name, expected)
            if got.shape is None and name.endswith(linear_suffixes):
                got = got._replace(also=" (neither it nor its qweight)")
            return got
        stored = index.header(qweight)[0]
        if len(stored) != 2:
            raise QuantizeError(f"{index.where[qweight]}: tensor {qweight!r}: shape {list(stored)}; a qweight is "
                                f"2-D (rows of int32 words)")
        rows, cols = stored
        unpacked = (cols * 8, rows) if method == "awq" else (cols, rows * 8)
        return sizes.Held(str(index.where[qweight]), qweight, unpacked, expected, packed=True)
    # Sizes first, from the headers: tensor_shapes below builds (on the meta device) as many layers
    # as the config says.
    sizes.check(cfg, families.get(cfg.family), ConfigOrigin(str(config_file)), held)
    shapes = tensor_shapes(cfg)
    quantized_names = _packed_linears(directory, index, shapes, method, linear_suffixes)
    if not quantized_names:
        raise QuantizeError(f"{directory}: quantization_config says {method}, but no linear has a qweight")
    for name in quantized_names:
        if shapes[name][1] % group:
            raise QuantizeError(f"{directory}: tensor {PREFIX + name!r}: group_size {group} does not divide its "
                                f"input size {shapes[name][1]}")
    ckpt = Checkpoint(directory, method, group, qc, index, cfg, tuple(quantized_names))
    quantized = set(quantized_names)

    def read(names: list[str]) -> dict[str, torch.Tensor]:
        plain = [n for n in names if n not in quantized]
        raw = index.read([PREFIX + n for n in plain]) if plain else {}
        got = {n: raw[PREFIX + n] for n in plain}
        for n in names:
            if n in quantized:
                got[n] = ckpt.linear(n).dequantized()
        return {n: got[n] for n in names}

    lm = {"embed_tokens.weight": PREFIX + "embed_tokens.weight", "lm_head.weight": "lm_head.weight"}
    if "lm_head.weight" not in index.where and cfg.tie_word_embeddings:
        lm["lm_head.weight"] = lm["embed_tokens.weight"]
    read_lm = None
    if all(v in index.where for v in lm.values()):
        def read_lm(names=LM_NAMES):
            got = index.read(sorted({lm[k] for k in names}))
            return {k: got[lm[k]] for k in names}

    fingerprint = {"kind": f"hf-{method}", "config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest(),
                   "prefix": PREFIX, "shards": index.fingerprint()}
    def read_reference(layers=None, norm=True) -> dict[str, torch.Tensor]:
        # The checkpoint's own config.json builds the reference; its linears are the dequantized
        # int4 values (faithfulness: the graph must compute exactly these weights).
        return families.get(cfg.family).to_checkpoint(cfg, read(reference_names(shapes, layers, norm)))

    return QuantizedSource(name=directory.resolve().name, config=cfg, kind=f"hf-{method}", read_tensors=read,
                           origin=ConfigOrigin(str(config_file)),
                           fingerprint=fingerprint, path=directory, read_lm=read_lm, checkpoint=ckpt,
                           reference_config=directory, read_reference=read_reference,
                           tokenizer=(lambda: load_tokenizer(directory)) if has_tokenizer(directory) else None)
