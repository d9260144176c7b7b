"""Reading selected tensors from a directory of (possibly sharded) safetensors files."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from kvplan.models.base import ModelError, file_fingerprint


class TensorIndex:
    """Maps checkpoint tensor names to the shard that holds them, without reading data."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ModelError(f"{index}: not a safetensors index ({e})") from None
            for name, shard in weight_map.items():
                self.where[name] = directory / shard
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
                hint = (f" (found {', '.join(pickles)}: torch pickles are not read, since loading them can run "
                        "arbitrary code; convert them to safetensors)") if pickles else ""
                raise ModelError(f"{directory}: no *.safetensors files{hint}")
            for shard in shards:
                with safe_open(shard, framework="pt") as f:
                    for name in f.keys():
                        self.where[name] = shard

    def shards(self) -> list[Path]:
        return sorted(set(self.where.values()))

    def fingerprint(self) -> list[dict]:
        out = []
        for shard in self.shards():
            if not shard.exists():
                raise ModelError(f"{shard}: shard listed in model.safetensors.index.json does not exist")
            out.append(file_fingerprint(shard))
        return out

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.where:
                raise ModelError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
            by_shard.setdefault(self.where[name], []).append(name)
        out = {}
        for shard, shard_names in by_shard.items():
            try:
                with safe_open(shard, framework="pt") as f:
                    present = set(f.keys())
                    for name in shard_names:
                        if name not in present:
                            raise ModelError(f"{shard}: tensor {name!r} is listed in the index but missing from the shard")
                        out[name] = f.get_tensor(name)
            except FileNotFoundError:
                raise ModelError(f"{shard}: shard file does not exist") from None
        return out
