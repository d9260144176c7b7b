"""A local Hugging Face checkpoint directory of a registered family (kvplan/models/families/)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from kvplan.config import ConfigError
from kvplan.models import families, sizes
from kvplan.models.base import LM_NAMES, ConfigOrigin, ModelError, ModelSource, reference_names
from kvplan.models.presets import tensor_shapes
from kvplan.models.safetensors_dir import TensorIndex
from kvplan.models.tokenizer import has_tokenizer, load_tokenizer


def accepts(arg: str) -> bool:
    return (Path(arg) / "config.json").is_file()


def read_config(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelError(f"{path}: invalid JSON ({e})") from None


def make_source(directory: Path, cfg_dict: dict, config_file: Path, prefix: str, kind: str,
                family: str | None = None, lm_names: dict[str, str] | None = None,
                reference_config: Path | dict | None = None, tokenizer: bool = True,
                embedding: str | None = None, field_prefix: str = "", field_names: dict | None = None) -> ModelSource:
    """A ModelSource reading the tensors under ``prefix`` of the directory's safetensors, through
    the family's mapping of checkpoint tensors to kvplan's. ``embedding``: the checkpoint's name of
    the input embedding matrix (default: ``lm_names``' embed_tokens.weight), where it holds one.
    ``field_prefix``: where in ``config_file`` the architecture's fields are (errors name them so)."""
    try:
        cfg = families.from_hf_dict(cfg_dict, str(config_file), family=family)
    except ConfigError as e:
        raise ModelError(str(e)) from None
    fam = families.get(cfg.family)
    index = TensorIndex(directory)
    origin = ConfigOrigin(str(config_file), prefix=field_prefix, **({"names": field_names} if field_names else {}))
    # Every decoder tensor present, in the shape the config says, before anything is built: a
    # missing tensor must fail before minutes of export, and a config's sizes before they are
    # allocated.
    sizes.check(cfg, fam, origin, lambda name, expected: held(index, prefix + name, expected))
    checkpoint_names = sorted({fam.checkpoint_name(cfg, n) for n in tensor_shapes(cfg)})

    def read_checkpoint(names):
        got = index.read([prefix + n for n in names])
        return {n: got[prefix + n] for n in names}
    read = families.reader(fam, cfg, read_checkpoint)

    read_lm = None
    if lm_names:
        available = {k: v for k, v in lm_names.items() if v in index.where}
        if "lm_head.weight" not in available and cfg.tie_word_embeddings and "embed_tokens.weight" in available:
            available["lm_head.weight"] = available["embed_tokens.weight"]
        if "lm_head.weight" in available:
            def read_lm(names=LM_NAMES):
                got = index.read(sorted({available[k] for k in names}))
                return {k: got[available[k]] for k in names}

    embedding = embedding or (lm_names or {}).get("embed_tokens.weight")
    read_embedding = None
    if embedding in index.where:
        def read_embedding():
            return index.read([embedding])[embedding]
    else:
        embedding = None

    fingerprint = {"kind": kind, "config_sha256": hashlib.sha256(config_file.read_bytes()).hexdigest(),
                   "prefix": prefix, "shards": index.fingerprint()}
    return ModelSource(name=directory.resolve().name, config=cfg, kind=kind, read_tensors=read,
                       fingerprint=fingerprint, path=directory, read_lm=read_lm,
                       reference_config=directory if reference_config is None else reference_config,
                       read_reference=lambda layers=None, norm=True: read_checkpoint(
                           reference_names(checkpoint_names, layers, norm)),
                       tokenizer=(lambda: load_tokenizer(directory)) if tokenizer and has_tokenizer(directory) else None,
                       read_embedding=read_embedding, embedding=embedding, origin=origin)


def held(index: TensorIndex, name: str, expected: tuple[int, ...]) -> sizes.Held:
    """What the checkpoint holds as tensor ``name`` (its header only), for sizes.check."""
    header = index.header(name)
    where = index.where.get(name, index.directory)
    return sizes.Held(str(where), name, None if header is None else header[0], expected)


def load(arg: str) -> ModelSource:
    directory = Path(arg)
    config_file = directory / "config.json"
    cfg_dict = read_config(config_file)
    return make_source(directory, cfg_dict, config_file, prefix="model.", kind="hf",
                       lm_names={"embed_tokens.weight": "model.embed_tokens.weight", "lm_head.weight": "lm_head.weight"})
