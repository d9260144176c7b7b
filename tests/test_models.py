"""Model sources: presets, Hugging Face checkpoint directories, MiniCPM-o-2_6 directories, and bad input."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kvplan.models import ModelError, resolve, safetensors_dir
from kvplan.models.families import hf_config_dict as to_hf_dict
from kvplan.models.presets import PRESETS, tensor_shapes
from kvplan.validate.reference import reference_embedding


def write_hf_dir(directory: Path, preset: str, shards: int = 2, prefix: str = "model.",
                 config: dict | None = None, extra: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """A checkpoint directory in Hugging Face's layout holding ``preset``'s weights (sharded with an index)."""
    source = resolve(preset)
    weights = source.read_tensors(list(tensor_shapes(source.config)))
    tensors = {prefix + k: v.contiguous() for k, v in weights.items()}
    tensors.update(extra or {})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config or to_hf_dict(source.config)))
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, directory / "model.safetensors")
        return weights
    weight_map = {}
    for s in range(shards):
        shard = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[s::shards]}
        save_file(part, directory / shard)
        weight_map.update({n: shard for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return weights


def minicpmo_config(tts: dict) -> dict:
    return {"model_type": "minicpmo", "architectures": ["MiniCPMO"], "hidden_size": 3584,
            "num_hidden_layers": 28, "vocab_size": 151700, "tts_config": tts}


@pytest.fixture
def reads(monkeypatch):
    """Every tensor name actually read from a safetensors file."""
    names: list[str] = []
    real = safetensors_dir.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self.f = real(*a, **kw)

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def keys(self):
            return self.inner.keys()

        def get_tensor(self, name):
            names.append(name)
            return self.inner.get_tensor(name)

        def get_slice(self, name):      # the header's shape and dtype, no data (sizes are checked so)
            return self.inner.get_slice(name)

    monkeypatch.setattr(safetensors_dir, "safe_open", Recording)
    return names


class TestPresets:
    def test_default_is_minicpmo_tts_architecture(self):
        cfg = resolve("minicpmo26-tts").config
        assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_layers,
                cfg.max_position_embeddings) == (768, 3072, 12, 20, 4096)

    def test_family_switches(self):
        assert PRESETS["tiny-llama"].num_kv_heads < PRESETS["tiny-llama"].num_heads
        assert PRESETS["tiny-qwen2"].qkv_bias and not PRESETS["tiny-qwen2"].o_bias
        assert PRESETS["tiny-qwen3"].qk_norm

    def test_weights_are_seeded_and_independent_of_read_order(self):
        a = resolve("tiny-llama").read_tensors(["layers.1.mlp.up_proj.weight", "norm.weight"])
        b = resolve("tiny-llama").read_tensors(["norm.weight", "layers.1.mlp.up_proj.weight"])
        assert all(torch.equal(a[k], b[k]) for k in a)


class TestHuggingFaceDirectory:
    @pytest.mark.parametrize("shards", [1, 2])
    def test_reads_config_and_weights(self, tmp_path, shards):
        weights = write_hf_dir(tmp_path / "ckpt", "tiny-qwen2", shards=shards)
        source = resolve(str(tmp_path / "ckpt"))
        assert source.config == PRESETS["tiny-qwen2"]
        got = source.read_tensors(["layers.2.self_attn.k_proj.bias"])
        assert torch.equal(got["layers.2.self_attn.k_proj.bias"], weights["layers.2.self_attn.k_proj.bias"])

    def test_transformers_5_rope_parameters_are_understood(self, tmp_path):
        cfg = to_hf_dict(PRESETS["tiny-llama"])
        theta = cfg.pop("rope_theta")
        cfg["rope_parameters"] = {"rope_type": "llama3", "rope_theta": theta, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 8192}
        write_hf_dir(tmp_path / "ckpt", "tiny-llama", config=cfg)
        source = resolve(str(tmp_path / "ckpt"))
        assert source.config.rope_type == "llama3" and source.config.rope["factor"] == 8.0

    def test_directory_without_config_is_refused(self, tmp_path):
        with pytest.raises(ModelError, match="no config.json"):
            resolve(str(tmp_path))

    def test_unsupported_architecture_is_named(self, tmp_path):
        cfg = to_hf_dict(PRESETS["tiny-llama"]) | {"model_type": "gpt2"}
        write_hf_dir(tmp_path / "ckpt", "tiny-llama", config=cfg)
        with pytest.raises(ModelError, match=r"config.json: model_type 'gpt2' is not supported"):
            resolve(str(tmp_path / "ckpt"))

    def test_missing_tensor_is_named_before_any_export(self, tmp_path):
        write_hf_dir(tmp_path / "ckpt", "tiny-llama")
        index = tmp_path / "ckpt" / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        del data["weight_map"]["model.layers.3.mlp.down_proj.weight"]
        index.write_text(json.dumps(data))
        with pytest.raises(ModelError, match=r"'model.layers.3.mlp.down_proj.weight' is missing"):
            resolve(str(tmp_path / "ckpt"))

    def test_tensor_listed_but_absent_from_its_shard_is_named(self, tmp_path):
        write_hf_dir(tmp_path / "ckpt", "tiny-llama")
        index = tmp_path / "ckpt" / "model.safetensors.index.json"
        data = json.loads(index.read_text())
        name = "model.layers.0.mlp.up_proj.weight"
        shard = data["weight_map"][name]
        other = next(s for s in set(data["weight_map"].values()) if s != shard)
        data["weight_map"][name] = other
        index.write_text(json.dumps(data))
        # Found when the source opens (the sizes are checked against the shards' headers).
        with pytest.raises(ModelError, match=rf"{other}: tensor '{name}' is listed in the index but missing"):
            resolve(str(tmp_path / "ckpt"))

    def test_torch_pickles_are_never_loaded(self, tmp_path):
        (tmp_path / "config.json").write_text(json.dumps(to_hf_dict(PRESETS["tiny-llama"])))
        (tmp_path / "pytorch_model.bin").write_bytes(b"not loaded")
        with pytest.raises(ModelError, match="pytorch_model.bin: torch pickles are not read"):
            resolve(str(tmp_path))

    def test_unknown_preset_lists_the_presets(self):
        with pytest.raises(ModelError, match="unknown model 'nope'.*minicpmo26-tts"):
            resolve("nope")


class TestMiniCPMoDirectory:
    TTS = {"model_type": "conditional_chattts", "llm_dim": 3584, "hidden_size": 64, "intermediate_size": 128,
           "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 4096,
           "num_audio_tokens": 626, "num_text_tokens": 21178, "num_vq": 4, "streaming": True}

    @pytest.fixture
    def checkpoint(self, tmp_path):
        """Tiny MiniCPM-o layout: the TTS decoder under tts.model.*, beside LLM and vision tensors."""
        import kvplan.models.presets as presets
        from kvplan.config import DecoderConfig
        cfg = DecoderConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=4,
                            head_dim=16, vocab_size=32000, family="llama")
        presets.PRESETS["_tiny-tts"] = cfg
        try:
            extra = {"llm.model.layers.0.mlp.up_proj.weight": torch.randn(8, 8),
                     "vpm.encoder.layers.0.weight": torch.randn(4, 4),
                     "tts.emb_code.0.weight": torch.randn(626, 64),
                     "tts.emb_text.weight": torch.randn(300, 64),
                     "tts.model.embed_tokens.weight": torch.randn(32000, 64)}
            weights = write_hf_dir(tmp_path / "MiniCPM-o-2_6", "_tiny-tts", shards=3, prefix="tts.model.",
                                   config=minicpmo_config(self.TTS), extra=extra)
        finally:
            del presets.PRESETS["_tiny-tts"]
        return tmp_path / "MiniCPM-o-2_6", cfg, weights

    def test_tts_config_maps_with_llama_defaults(self, checkpoint):
        directory, cfg, _ = checkpoint
        source = resolve(str(directory))
        assert source.kind == "minicpmo"
        assert source.config == cfg
        assert source.config.rms_norm_eps == 1e-6 and source.config.rope_theta == 10000.0

    def test_reads_only_tts_decoder_tensors(self, checkpoint, reads):
        directory, _, weights = checkpoint
        source = resolve(str(directory))
        got = source.read_tensors(list(weights))
        assert all(torch.equal(got[k], weights[k]) for k in weights)
        assert reads and all(name.startswith("tts.model.layers.") or name == "tts.model.norm.weight" for name in reads)

    def test_the_tts_is_fed_its_text_token_embedding_not_the_unused_llama_one(self, checkpoint):
        directory, _, _ = checkpoint
        source = resolve(str(directory))
        shard = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]["tts.emb_text.weight"]
        with safe_open(str(directory / shard), "pt") as f:
            want = f.get_tensor("tts.emb_text.weight")
        assert source.embedding == "tts.emb_text.weight" and torch.equal(source.read_embedding(), want)
        assert source.read_lm is None and source.tokenizer is None
        ids = torch.tensor([[0, 17, 299]])
        assert torch.equal(reference_embedding(source)(ids), want[ids])

    def test_missing_tts_config_is_named(self, tmp_path):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "minicpmo"}))
        with pytest.raises(ModelError, match="without a 'tts_config'"):
            resolve(str(tmp_path))

    def test_exported_tts_decoder_matches_transformers(self, checkpoint, tmp_path):
        import numpy as np

        from kvplan.decoder import pack_specs
        from kvplan.export.exporter import causal_mask, export_pack
        from kvplan.validate.onnx_stack import OnnxStack, Pack
        from kvplan.validate.reference import HFReference
        directory, cfg, _ = checkpoint
        source = resolve(str(directory))
        spec = pack_specs(cfg, 0)[0]
        export_pack(source, spec, "float32", 1, tmp_path / "tts.onnx")
        ref = HFReference(source)
        cache = ref.prefill(torch.randn(1, 12, cfg.hidden_size))
        past = [t.numpy() for t in ref.cache_tensors(cache, cfg.num_layers)]
        hidden = torch.randn(1, 3, cfg.hidden_size)
        mask = causal_mask(1, 3, 12, torch.float32)
        pos = torch.arange(12, 15)[None]
        want = ref.step(hidden, mask, pos, cache)
        got, _ = OnnxStack([Pack(spec, tmp_path / "tts.onnx")]).step(hidden.numpy(), mask.numpy(), pos.numpy(), past)
        assert np.abs(got - want.hidden.numpy()).max() < 1e-4
