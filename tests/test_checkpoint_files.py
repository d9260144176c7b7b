"""Which files a checkpoint directory may make kvplan read, and damaged files (issue: a new user's faults).

Checkpoints are written by transformers' save_pretrained (sharded, with an index); the tests
then edit the index or the shards as a careless or hostile download would.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvplan import profiles
from kvplan import target as target_mod
from kvplan.models import ModelError, resolve
from kvplan.models.presets import tensor_shapes

transformers = pytest.importorskip("transformers")

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64, max_position_embeddings=4096)
    path = tmp_path_factory.mktemp("ckpt") / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(path, max_shard_size="20KB")
    assert (path / INDEX).exists()
    return path


@pytest.fixture
def copy(checkpoint, tmp_path):
    out = tmp_path / "llama"
    shutil.copytree(checkpoint, out)
    return out


def _edit_index(directory: Path, change) -> None:
    index = json.loads((directory / INDEX).read_text())
    change(index["weight_map"])
    (directory / INDEX).write_text(json.dumps(index))


def _first_shard(directory: Path) -> str:
    return sorted(json.loads((directory / INDEX).read_text())["weight_map"].values())[0]


@pytest.mark.parametrize("entry", ["../../../../etc/passwd", "../outside.safetensors", "/etc/passwd",
                                   "sub/../../x.safetensors"])
def test_an_index_entry_outside_the_directory_is_refused_naming_it(copy, entry):
    name = next(iter(json.loads((copy / INDEX).read_text())["weight_map"]))
    _edit_index(copy, lambda m: m.__setitem__(name, entry))
    with pytest.raises(ModelError, match=rf"{INDEX}: weight_map\['{name}'\]: shard '{entry}' is outside"):
        resolve(str(copy))


def test_a_shard_in_a_subdirectory_is_read_recorded_and_a_dependency(copy):
    shard = _first_shard(copy)
    (copy / "sub").mkdir()
    (copy / shard).rename(copy / "sub" / shard)
    _edit_index(copy, lambda m: m.update({k: f"sub/{v}" for k, v in m.items() if v == shard}))
    source = resolve(str(copy))
    assert f"sub/{shard}" in [s["file"] for s in source.fingerprint["shards"]]
    profile = profiles.load("fp32")
    deps = target_mod.dependencies(source, profile, Path("unused"))["depends"]
    assert str((copy / "sub" / shard).absolute()) in deps and str((copy / INDEX).absolute()) in deps


def test_a_symlinked_shard_inside_the_directory_is_fine(copy, tmp_path):
    """Hugging Face's cache links snapshot files to blobs elsewhere: the name is what counts."""
    shard = _first_shard(copy)
    blob = tmp_path / "blobs" / "0123abcd"
    blob.parent.mkdir()
    (copy / shard).rename(blob)
    (copy / shard).symlink_to(blob)
    assert resolve(str(copy)).config.num_layers == 2


def test_a_truncated_shard_is_a_one_line_error_naming_it(copy):
    shard = copy / _first_shard(copy)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ModelError, match=rf"{shard}: "):
        source = resolve(str(copy))
        source.read_tensors(list(tensor_shapes(source.config)))


@pytest.mark.parametrize("text", ["[1, 2]", '{"weight_map": [1, 2]}', "{not json"])
def test_an_index_that_is_not_an_index_is_refused(copy, text):
    (copy / INDEX).write_text(text)
    with pytest.raises(ModelError, match=f"{INDEX}: not a safetensors index"):
        resolve(str(copy))
