"""Every registered model family, the same specification: its I/O contract, ONNX Runtime
against transformers on a checkpoint transformers itself wrote (save_pretrained of the
family's tiny config), the exact fused-op counts after surgery, and the refusals.

The reference side never goes through kvplan: the checkpoint is written by transformers,
read back by ``from_pretrained`` with transformers' own masks (causal, and the sliding
window where the config has one); only the kvplan side's masks are written here, from the
contract's rule (0 keeps, finfo.min masks; a window hides keys ``window`` or more
positions back).
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
import transformers

from kvplan import surgery
from kvplan.config import DecoderConfig
from kvplan.decoder import pack_specs
from kvplan.export.exporter import causal_mask, export_pack, io_contract
from kvplan.models import ModelError, resolve
from kvplan.models.families import FAMILIES, hf_config_dict
from kvplan.models.presets import PRESETS, tensor_shapes
from kvplan.validate.onnx_stack import OnnxStack, Pack
from kvplan.validate.reference import HFReference

NAMES = sorted(FAMILIES)
# (N, lastSum) steps after each other: a prefill longer than tiny-mistral's window, a decode
# step, and a chunk.
STEPS = [(10, 0), (1, 10), (3, 11)]


def save_checkpoint(name: str, directory, seed: int = 0, **overrides) -> transformers.PreTrainedModel:
    """The family's tiny config as a checkpoint written by transformers' save_pretrained,
    with transformers' own initialisation plus noise on the norms and biases (which it
    initialises to constants, so a misplaced one would go unnoticed)."""
    family = FAMILIES[name]
    d = hf_config_dict(family.tiny) | overrides
    config = transformers.AutoConfig.for_model(d.pop("model_type"), **d)
    torch.manual_seed(seed)
    model = getattr(transformers, family.reference_classes[1])(config)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname or pname.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    return model


def from_pretrained(directory, name: str):
    model = getattr(transformers, FAMILIES[name].reference_classes[1]).from_pretrained(
        directory, attn_implementation="eager")
    return model.eval()


def hf_steps(model, steps, seed: int = 1):
    """transformers' hidden_out and cache after each step, with masks of its own making."""
    cache = transformers.DynamicCache(config=model.config)
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    out = []
    with torch.no_grad():
        for n, last in steps:
            hidden = torch.randn(1, n, cfg.hidden_size, generator=g)
            pos = torch.arange(last, last + n)[None]
            res = model.model(inputs_embeds=hidden, position_ids=pos, cache=cache, use_cache=True)
            kv = [t.clone().numpy() for layer in cache.layers for t in (layer.keys, layer.values)]
            out.append((hidden, res.last_hidden_state.numpy(), kv))
    return out


def onnx_steps(path, cfg: DecoderConfig, spec, hf, window: int):
    stack = OnnxStack([Pack(spec, path)])
    past = [np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), np.float32) for _ in range(2 * cfg.num_layers)]
    out = []
    for (n, last), (hidden, _, _) in zip(STEPS, hf):
        mask = causal_mask(1, n, last, torch.float32, window=window).numpy()
        got, past = stack.step(hidden.numpy(), mask, np.arange(last, last + n)[None], past)
        out.append((got, past))
    return out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoint(family) -> (directory, source, exported pack path), once per family."""
    made = {}

    def get(name):
        if name not in made:
            root = tmp_path_factory.mktemp(f"family-{name}")
            save_checkpoint(name, root / "ckpt")
            source = resolve(str(root / "ckpt"))
            spec = pack_specs(source.config, 0)[0]
            export_pack(source, spec, "float32", 1, root / "decoder.onnx")
            made[name] = (root / "ckpt", source, spec, root / "decoder.onnx")
        return made[name]
    return get


def test_every_family_has_a_tiny_preset_and_its_reference_classes():
    for name, family in FAMILIES.items():
        assert PRESETS[f"tiny-{name}"] == family.tiny and family.tiny.family == name
        for cls in family.reference_classes:
            assert hasattr(transformers, cls), cls


@pytest.mark.parametrize("name", NAMES)
def test_checkpoint_config_reads_back_as_the_tiny_config(name, checkpoint):
    _, source, _, _ = checkpoint(name)
    assert source.config == FAMILIES[name].tiny


@pytest.mark.parametrize("name", NAMES)
def test_exported_graph_has_the_io_contract(name, export_tiny):
    (pack,) = export_tiny(f"tiny-{name}")
    cfg = PRESETS[f"tiny-{name}"]
    contract = io_contract(cfg, pack.spec, 1, "float32")
    graph = onnx.load(str(pack.path), load_external_data=False).graph

    def dims(values):
        return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}
    assert dims(graph.input) == {k: v["shape"] for k, v in contract["inputs"].items()}
    assert dims(graph.output) == {k: v["shape"] for k, v in contract["outputs"].items()}


@pytest.mark.parametrize("name", NAMES)
def test_onnx_runtime_matches_transformers_from_pretrained(name, checkpoint):
    directory, source, spec, path = checkpoint(name)
    hf = hf_steps(from_pretrained(directory, name), STEPS)
    got = onnx_steps(path, source.config, spec, hf, source.config.sliding_window)
    for (n, last), (_, want, want_kv), (hidden, kv) in zip(STEPS, hf, got):
        assert np.abs(hidden - want).max() < 1e-4, (n, last)
        # transformers' cache keeps only the window's rows on sliding layers; kvplan's the whole past.
        assert max(np.abs(a[:, :, -b.shape[2]:] - b).max() for a, b in zip(kv, want_kv)) < 1e-4, (n, last)


def test_mistral_sliding_window_is_honoured_through_the_mask(checkpoint):
    """Past the window, the graph agrees with transformers only when the runtime's mask hides
    the keys behind the window: kvplan's causal_mask(window=) does, a plain causal mask does not."""
    directory, source, spec, path = checkpoint("mistral")
    assert 0 < source.config.sliding_window < STEPS[0][0]
    hf = hf_steps(from_pretrained(directory, "mistral"), STEPS)
    windowed = onnx_steps(path, source.config, spec, hf, source.config.sliding_window)
    plain = onnx_steps(path, source.config, spec, hf, 0)
    want = hf[0][1]
    assert np.abs(windowed[0][0] - want).max() < 1e-4
    assert np.abs(plain[0][0] - want).max() > 1e-2


def test_a_window_wider_than_every_position_reads_and_is_recorded():
    cfg = dict(hf_config_dict(FAMILIES["mistral"].tiny), sliding_window=4096)
    from kvplan.models.families import from_hf_dict
    assert from_hf_dict(cfg, "config.json").sliding_window == 4096


def test_mistral_window_defaults_as_transformers_does():
    cfg = hf_config_dict(FAMILIES["mistral"].tiny)
    del cfg["sliding_window"]
    from kvplan.models.families import from_hf_dict
    assert from_hf_dict(cfg, "config.json").sliding_window == transformers.MistralConfig().sliding_window


def test_a_window_on_some_layers_only_is_refused_with_the_reason(tmp_path):
    save_checkpoint("qwen2", tmp_path, use_sliding_window=True, sliding_window=8, max_window_layers=2)
    with pytest.raises(ModelError, match=r"config.json: sliding_window 8 on 2 of 4 layers is not supported: "
                                         r"kvplan's layers share one attention mask"):
        resolve(str(tmp_path))


def test_a_window_on_some_layers_at_least_max_positions_is_harmless(tmp_path):
    save_checkpoint("qwen2", tmp_path, use_sliding_window=True, sliding_window=4096, max_window_layers=2)
    assert resolve(str(tmp_path)).config.sliding_window == 0


def test_reference_is_built_from_the_checkpoints_config_json(checkpoint):
    """A field kvplan misreads shows up as a mismatch: the reference takes rms_norm_eps from
    config.json, not from kvplan's config."""
    directory, source, spec, path = checkpoint("llama")
    misread = dataclasses.replace(source, config=dataclasses.replace(source.config, rms_norm_eps=0.5))
    ref = HFReference(misread)
    assert ref.hf_config.rms_norm_eps == json.loads((directory / "config.json").read_text())["rms_norm_eps"]
    export_pack(misread, spec, "float32", 1, path.with_name("misread.onnx"))
    cache = ref.prefill(torch.randn(1, 4, source.config.hidden_size))
    past = [t.numpy() for t in ref.cache_tensors(cache, source.config.num_layers)]
    hidden = torch.randn(1, 2, source.config.hidden_size)
    want = ref.step(hidden, causal_mask(1, 2, 4, torch.float32), torch.arange(4, 6)[None], cache).hidden.numpy()
    got, _ = OnnxStack([Pack(spec, path.with_name("misread.onnx"))]).step(
        hidden.numpy(), causal_mask(1, 2, 4, torch.float32).numpy(), np.arange(4, 6)[None], past)
    assert np.abs(got - want).max() > 1e-2


@pytest.mark.parametrize("name", NAMES)
def test_reference_of_the_preset_matches_its_export(name, export_tiny):
    """Presets: the reference is the family's transformers model built from the config.json the
    family writes, holding the preset's tensors in the checkpoint's layout."""
    (pack,) = export_tiny(f"tiny-{name}")
    source = resolve(f"tiny-{name}")
    ref = HFReference(source)
    cfg = source.config
    cache = ref.prefill(torch.randn(1, 9, cfg.hidden_size))
    past = [t.numpy() for t in ref.cache_tensors(cache, cfg.num_layers)]
    hidden = torch.randn(1, 3, cfg.hidden_size)
    mask = causal_mask(1, 3, 9, torch.float32, window=cfg.sliding_window)
    want = ref.step(hidden, mask, torch.arange(9, 12)[None], cache).hidden.numpy()
    got, _ = OnnxStack([pack]).step(hidden.numpy(), mask.numpy(), np.arange(9, 12)[None], past)
    assert np.abs(got - want).max() < 1e-4


def expected_fusions(cfg: DecoderConfig) -> dict[str, int]:
    layers = cfg.num_layers
    norms = layers * (4 if cfg.sandwich_norm else 2) + 1 + (2 * layers if cfg.qk_norm else 0)
    # Soft-capped logits are not fused (ONNX's Attention caps after adding the mask), nor is
    # partial rotary (both reported as near misses).
    return {"rmsnorm": norms, "rope": 2 * layers if cfg.partial_rotary_factor == 1 else 0,
            "attention": 0 if cfg.attn_softcap else layers}


@pytest.mark.parametrize("name", NAMES)
def test_fused_op_counts_after_surgery(name, export_tiny, tmp_path):
    (pack,) = export_tiny(f"tiny-{name}")
    report = surgery.fuse_file(pack.path, tmp_path / "fused.onnx", ["rmsnorm", "rope", "attention"], log=None)
    want = expected_fusions(PRESETS[f"tiny-{name}"])
    assert {k: p["fused"] for k, p in report["passes"].items()} == want
    ops = report["ops_after"]
    assert (ops.get("RMSNormalization", 0), ops.get("RotaryEmbedding", 0), ops.get("Attention", 0)) == \
        (want["rmsnorm"], want["rope"], want["attention"])


@pytest.mark.parametrize("name", NAMES)
def test_weight_count_is_the_exported_tensors(name):
    cfg = PRESETS[f"tiny-{name}"]
    assert cfg.weight_count() == sum(int(np.prod(s)) for s in tensor_shapes(cfg).values())


def test_weight_count_includes_o_and_mlp_biases():
    cfg = dataclasses.replace(FAMILIES["llama"].tiny, qkv_bias=True, o_bias=True, mlp_bias=True)
    assert cfg.weight_count() == sum(int(np.prod(s)) for s in tensor_shapes(cfg).values())


class TestGemma2:
    def test_norm_gains_are_folded_as_one_plus_w(self, checkpoint):
        directory, source, _, _ = checkpoint("gemma2")
        from safetensors import safe_open
        with safe_open(directory / "model.safetensors", framework="pt") as f:
            stored = f.get_tensor("model.layers.1.pre_feedforward_layernorm.weight")
        got = source.read_tensors(["layers.1.pre_feedforward_layernorm.weight"])
        assert torch.equal(got["layers.1.pre_feedforward_layernorm.weight"], 1.0 + stored.float())

    def test_sliding_layers_cap_the_positions_at_the_window(self):
        from kvplan.models.families import from_hf_dict
        cfg = hf_config_dict(FAMILIES["gemma2"].tiny) | {"sliding_window": 2048}
        assert from_hf_dict(cfg, "config.json").max_position_embeddings == 2048

    def test_gemma2_defaults_are_transformers_defaults(self):
        from kvplan.models.families import from_hf_dict
        d = {"model_type": "gemma2", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
             "num_attention_heads": 4}
        cfg = from_hf_dict(d, "config.json")
        ref = transformers.Gemma2Config(**{k: v for k, v in d.items() if k != "model_type"})
        assert (cfg.head_dim, cfg.attn_softcap, cfg.scale, cfg.max_position_embeddings) == \
            (ref.head_dim, ref.attn_logit_softcapping, ref.query_pre_attn_scalar ** -0.5, ref.sliding_window)

    def test_another_activation_is_refused_naming_the_field(self, tmp_path):
        from kvplan.errors import ConfigError
        from kvplan.models.families import from_hf_dict
        cfg = hf_config_dict(FAMILIES["gemma2"].tiny) | {"hidden_activation": "relu"}
        with pytest.raises(ConfigError, match="config.json: hidden_activation 'relu' is not supported for gemma2"):
            from_hf_dict(cfg, "config.json")

    def test_soft_capped_attention_is_reported_not_fused(self, export_tiny, tmp_path):
        (pack,) = export_tiny("tiny-gemma2")
        report = surgery.fuse_file(pack.path, tmp_path / "fused.onnx", ["attention"], log=None)
        misses = report["passes"]["attention"]["near_misses"]
        assert len(misses) == PRESETS["tiny-gemma2"].num_layers
        assert all(m["reason"].startswith("soft-capped logits") and "Tanh" in m["reason"] for m in misses)
        assert all(any("tanh" in n.lower() for n in m["nodes"]) for m in misses)


class TestPhi3:
    def test_fused_projections_are_split_when_read(self, checkpoint):
        directory, source, _, _ = checkpoint("phi3")
        from safetensors import safe_open
        cfg = source.config
        with safe_open(directory / "model.safetensors", framework="pt") as f:
            qkv = f.get_tensor("model.layers.2.self_attn.qkv_proj.weight")
            gate_up = f.get_tensor("model.layers.2.mlp.gate_up_proj.weight")
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        names = [f"layers.2.self_attn.{p}_proj.weight" for p in "qkv"] + \
                [f"layers.2.mlp.{p}_proj.weight" for p in ("gate", "up")]
        got = source.read_tensors(names)
        assert torch.equal(torch.cat([got[n] for n in names[:3]]), qkv) and got[names[1]].shape[0] == kv
        assert got[names[0]].shape[0] == q
        assert torch.equal(torch.cat([got[n] for n in names[3:]]), gate_up)

    def test_longrope_caps_positions_at_the_original_context(self):
        from kvplan.models.families import from_hf_dict
        d = hf_config_dict(FAMILIES["phi3"].tiny)
        d["max_position_embeddings"] = 131072
        d["rope_scaling"] = {k: v for k, v in d["rope_scaling"].items() if k != "factor"}
        cfg = from_hf_dict(d, "config.json")
        assert cfg.max_position_embeddings == 4096 and cfg.rope["factor"] == 32.0

    def test_short_factor_of_the_wrong_length_is_refused(self):
        from kvplan.errors import ConfigError
        from kvplan.models.families import from_hf_dict
        d = hf_config_dict(FAMILIES["phi3"].tiny)
        d["rope_scaling"]["short_factor"] = [1.0, 1.0]
        with pytest.raises(ConfigError, match=r"config.json: rope_scaling.short_factor must list 6 numbers"):
            from_hf_dict(d, "config.json")


class TestConfigErrors:
    """Bad config.json fields: one line naming the file and the field, never a traceback."""

    def check(self, tmp_path, change, match):
        from kvplan.errors import ConfigError
        from kvplan.models.families import from_hf_dict
        d = hf_config_dict(FAMILIES["llama"].tiny)
        d = change(d)
        with pytest.raises(ConfigError, match=match):
            from_hf_dict(d, "ckpt/config.json")

    def test_a_non_integer_size(self, tmp_path):
        self.check(tmp_path, lambda d: d | {"hidden_size": "sixty-four"},
                   r"ckpt/config.json: hidden_size must be an integer, got 'sixty-four'")

    def test_a_fractional_size_is_not_truncated(self, tmp_path):
        self.check(tmp_path, lambda d: d | {"hidden_size": 64.7}, r"hidden_size must be an integer, got 64.7")

    def test_llama3_rope_without_factor(self, tmp_path):
        self.check(tmp_path, lambda d: d | {"rope_scaling": {"rope_type": "llama3"}},
                   r"ckpt/config.json: rope_scaling type 'llama3' needs a positive 'factor'")

    def test_a_rope_type_the_family_does_not_implement(self, tmp_path):
        self.check(tmp_path, lambda d: d | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}},
                   r"rope_scaling type 'yarn' is not supported for llama")

    def test_a_config_that_is_not_an_object(self, tmp_path):
        self.check(tmp_path, lambda d: [d], r"ckpt/config.json: not a JSON object")
