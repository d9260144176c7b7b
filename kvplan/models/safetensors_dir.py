"""Reading selected tensors from a directory of (possibly sharded) safetensors files."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path, PurePosixPath

from safetensors import SafetensorError, safe_open

from kvplan.lazy import lazy_import
from kvplan.models.base import ModelError, file_fingerprint

torch = lazy_import("torch")


def _inside(directory: Path, entry: str, index: Path, name: str) -> Path:
    """The shard an index entry names, which must lie in the checkpoint directory: an absolute
    path or one climbing out with '..' is refused. Judged on the name as written, not on where
    a symlink points (Hugging Face's cache links snapshot files to blobs elsewhere)."""
    if not isinstance(entry, str) or not entry:
        raise ModelError(f"{index}: weight_map[{name!r}]: shard must be a file name, got {entry!r}")
    parts = PurePosixPath(entry.replace(os.sep, "/"))
    if parts.is_absolute() or ".." in parts.parts or Path(entry).is_absolute():
        raise ModelError(f"{index}: weight_map[{name!r}]: shard {entry!r} is outside the checkpoint directory "
                         f"{directory}; shards must be files inside it")
    return directory / parts


@contextlib.contextmanager
def _open(shard: Path, framework: str = "pt"):
    """safe_open, with a damaged or truncated file reported as the checkpoint's fault. Reading only
    headers, ``framework="numpy"``: the "pt" framework imports torch, which deciding that a build
    is up to date never needs."""
    try:
        with safe_open(shard, framework=framework) as f:
            yield f
    except FileNotFoundError:
        raise ModelError(f"{shard}: shard file does not exist") from None
    except (SafetensorError, OSError, ValueError) as e:
        if isinstance(e, ModelError):
            raise
        raise ModelError(f"{shard}: not a readable safetensors file ({e})") from None


def _header(f) -> dict[str, tuple[tuple[int, ...], str]]:
    """Each tensor's shape and dtype in an opened shard (its header: slices read no data)."""
    out = {}
    for name in f.keys():
        piece = f.get_slice(name)
        out[name] = (tuple(piece.get_shape()), piece.get_dtype())
    return out


class TensorIndex:
    """Maps checkpoint tensor names to the shard that holds them, without reading data."""

    def __init__(self, directory: Path):
        self.directory = directory
        index = directory / "model.safetensors.index.json"
        self.where: dict[str, Path] = {}
        self._headers: dict[Path, dict[str, tuple[tuple[int, ...], str]]] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                items = weight_map.items()
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
                raise ModelError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
            for name, shard in items:
                self.where[name] = _inside(directory, shard, index, name)
        else:
            shards = sorted(directory.glob("*.safetensors"))
            if not shards:
                pickles = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
                hint = (f" (found {', '.join(pickles)}: torch pickles are not read, since loading them can run "
                        "arbitrary code; convert them to safetensors)") if pickles else ""
                raise ModelError(f"{directory}: no *.safetensors files{hint}")
            for shard in shards:
                with _open(shard, "numpy") as f:
                    self._headers[shard] = _header(f)
                    for name in f.keys():
                        self.where[name] = shard

    def header(self, name: str) -> tuple[tuple[int, ...], str] | None:
        """The shape and safetensors dtype ("F16", "I32", ...) of tensor ``name``, from its shard's
        header (no tensor data is read); None when the checkpoint has no such tensor."""
        shard = self.where.get(name)
        if shard is None:
            return None
        if shard not in self._headers:
            with _open(shard, "numpy") as f:
                self._headers[shard] = _header(f)
        got = self._headers[shard].get(name)
        if got is None:
            raise ModelError(f"{shard}: tensor {name!r} is listed in the index but missing from the shard")
        return got

    def shards(self) -> list[Path]:
        return sorted(set(self.where.values()))

    def fingerprint(self) -> list[dict]:
        out = []
        for shard in self.shards():
            if not shard.exists():
                raise ModelError(f"{shard}: shard listed in model.safetensors.index.json does not exist")
            # The path inside the directory, not the bare name: a shard in a subdirectory is a
            # different file from one of the same name beside config.json.
            out.append({**file_fingerprint(shard), "file": shard.relative_to(self.directory).as_posix()})
        return out

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        by_shard: dict[Path, list[str]] = {}
        for name in names:
            if name not in self.where:
                raise ModelError(f"{self.directory}: tensor {name!r} is missing from the checkpoint")
            by_shard.setdefault(self.where[name], []).append(name)
        out = {}
        for shard, shard_names in by_shard.items():
            with _open(shard) as f:
                present = set(f.keys())
                for name in shard_names:
                    if name not in present:
                        raise ModelError(f"{shard}: tensor {name!r} is listed in the index but missing from the shard")
                    try:
                        out[name] = f.get_tensor(name)
                    except (SafetensorError, OSError, ValueError) as e:
                        raise ModelError(f"{shard}: tensor {name!r} cannot be read ({e})") from None
        return out
