"""The result of quantization: per linear its int4 values and scales, plus the full-precision
tensors that quantization changed (AWQ folds its scales into norms and preceding linears).

Layout is the graph's: a linear ``y = x W^T`` (torch weight [out, in]) becomes
``y = x @ DQ(q, scale)`` with ``q`` [K = in, N = out] and ``scale`` [K/G, N], so groups of G
consecutive input channels share a scale, which is DequantizeLinear's blocked form on axis 0.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kvplan.errors import QuantizeError
from kvplan.fileio import atomic_directory
from kvplan.lazy import lazy_import
from kvplan.models import families
from kvplan.models.base import ModelSource, reference_names
from kvplan.models.int4 import QuantLinear  # noqa: F401  (re-exported: the quantizers make them)
from kvplan.models.presets import tensor_shapes

safetensors = lazy_import("safetensors")
safetensors_torch = lazy_import("safetensors.torch")
torch = lazy_import("torch")

INT4_MIN, INT4_MAX = -8, 7


@dataclass
class Quantized:
    """Every quantized linear by its tensor name (``layers.3.mlp.up_proj.weight``) and every
    full-precision tensor quantization replaced (norm weights, biases, unquantized linears
    that AWQ scaled), with how they were made."""
    linears: dict[str, QuantLinear] = field(default_factory=dict)
    replaced: dict[str, torch.Tensor] = field(default_factory=dict)
    record: dict = field(default_factory=dict)

    def save(self, path: Path) -> None:
        tensors, meta = {}, {}
        for name, ql in self.linears.items():
            tensors[f"{name}.q"] = ql.q.contiguous()
            tensors[f"{name}.scale"] = ql.scale.contiguous()
            meta[name] = str(ql.group_size)
            if ql.correction is not None:
                tensors[f"{name}.correction"] = ql.correction.contiguous()
            if ql.perm is not None:
                tensors[f"{name}.perm"] = ql.perm.contiguous()
        for name, t in self.replaced.items():
            tensors[f"{name}.replaced"] = t.contiguous()
        # Written by safetensors itself (no whole-file bytes object in memory), inside a marked
        # directory: safetensors writes its own temporary file beside the name it is given, and a
        # kill leaves that only where the next build looks for leftovers.
        with atomic_directory(path) as tmp:
            safetensors_torch.save_file(tensors, str(tmp / path.name), metadata=meta)

    @classmethod
    def load(cls, path: Path) -> "Quantized":
        """The file's linears and replaced tensors, each read from it when asked for (validation
        holds a loaded Quantized for its whole run: the default int4 model's file is 186 MiB)."""
        with safetensors.safe_open(str(path), framework="pt") as f:
            groups = {name: int(g) for name, g in (f.metadata() or {}).items()}
            keys = set(f.keys())

        def linear(f, name: str) -> QuantLinear:
            return QuantLinear(f.get_tensor(f"{name}.q"), f.get_tensor(f"{name}.scale"), groups[name],
                               f.get_tensor(f"{name}.correction") if f"{name}.correction" in keys else None,
                               f.get_tensor(f"{name}.perm") if f"{name}.perm" in keys else None)

        replaced = [k.removesuffix(".replaced") for k in sorted(keys) if k.endswith(".replaced")]
        return cls(_OnDisk(path, list(groups), linear), _OnDisk(path, replaced, lambda f, n: f.get_tensor(f"{n}.replaced")))


class _OnDisk(Mapping):
    """Tensors of a safetensors file by name, read when looked up, never held."""

    def __init__(self, path: Path, names: list[str], read):
        self.path, self._names, self._read = Path(path), dict.fromkeys(names), read

    def __getitem__(self, name: str):
        if name not in self._names:
            raise KeyError(name)
        with safetensors.safe_open(str(self.path), framework="pt") as f:
            return self._read(f, name)

    def __contains__(self, name) -> bool:
        # Mapping's own would read the tensor to find out.
        return name in self._names

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def dequantized_source(source: ModelSource, quantized: Quantized) -> ModelSource:
    """``source`` with every quantized linear read as its dequantized weight and every replaced
    tensor as its replacement: the PyTorch model the int4 graph computes exactly (faithfulness)."""
    def read(names: list[str]) -> dict[str, torch.Tensor]:
        plain = [n for n in names if n not in quantized.linears and n not in quantized.replaced]
        got = source.read_tensors(plain) if plain else {}
        for n in names:
            if n in quantized.linears:
                got[n] = quantized.linears[n].dequantized()
            elif n in quantized.replaced:
                got[n] = quantized.replaced[n].to(torch.float32)
        return {n: got[n] for n in names}

    def read_reference(layers=None, norm=True) -> dict[str, torch.Tensor]:
        # transformers reads the checkpoint's own layout (fused projections, unfolded gains):
        # the dequantized weights are mapped back into it by the family.
        family = families.get(source.config.family)
        return family.to_checkpoint(source.config, read(reference_names(tensor_shapes(source.config), layers, norm)))

    # Everything else (embeddings, LM head, tokenizer) is the source's own: int4 covers the linears only.
    return dataclasses.replace(source, read_tensors=read, read_reference=read_reference)


def check_group(name: str, in_features: int, group_size: int) -> None:
    if in_features % group_size:
        raise QuantizeError(f"tensor {name!r}: group_size {group_size} does not divide its input size "
                            f"{in_features}")
