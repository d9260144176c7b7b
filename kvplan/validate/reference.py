"""The independent PyTorch reference: transformers' own model, driven with its own cache.

Nothing here touches kvplan's decoder module or its reading of the checkpoint: the
config is the checkpoint's own (``AutoConfig`` on the directory; for presets, the
config.json their family writes), so a field kvplan drops or misreads shows up as a
mismatch, and the weights are the checkpoint's own tensors (fused projections still
fused). The model class is the family's (kvplan/models/families/). Only
transformers' public API is used (config classes, model classes, DynamicCache), with a
shim for the 4.x/5.x cache argument rename.
"""
from __future__ import annotations

import copy
import functools
import inspect
from dataclasses import dataclass
from pathlib import Path

from transformers import AutoConfig, DynamicCache

from kvplan.lazy import lazy_import

try:                                   # transformers 5.x
    from transformers.initialization import no_init_weights
except ImportError:                    # 4.x
    from transformers.modeling_utils import no_init_weights

from kvplan.models import ModelSource
from kvplan.models.families import get as get_family
from kvplan.pipeline import trim_heap

torch = lazy_import("torch")
transformers = lazy_import("transformers")

ATTENTION = ("sdpa", "eager")
CONVERT_CHUNK = 1 << 22                # elements converted at a time when a weight changes dtype


def attention_for(hf_config, model_class) -> str:
    """transformers' attention the reference runs: ``sdpa`` where it computes what eager does,
    else ``eager``.

    Both take the 4D additive float mask as given (transformers passes a 4D mask through
    untouched, and torch's scaled_dot_product_attention adds a float ``attn_mask`` to the
    scaled scores before a float32-accumulated softmax, as eager does), so masked slots, a
    sliding window and rows that see nothing come out the same (tests/test_reference_attention.py).
    sdpa is several times faster on the CPU at long lastSum. Eager stays where sdpa cannot
    be exact: soft-capped logits (Gemma 2; transformers' sdpa refuses a softcap) and classes
    without sdpa support.
    """
    if getattr(hf_config, "attn_logit_softcapping", None) or not getattr(model_class, "_supports_sdpa", False):
        return "eager"
    return "sdpa"


def _hf_config(source: ModelSource, attention: str | None = None):
    if source.reference_config is None:
        raise ValueError(f"{source.name}: this model source names no reference config")
    if isinstance(source.reference_config, Path):
        cfg = AutoConfig.from_pretrained(source.reference_config)
    else:
        d = dict(source.reference_config)
        cfg = AutoConfig.for_model(d.pop("model_type"), **d)
    if attention is None:
        decoder_class = get_family(source.config.family).reference_classes[0]
        attention = attention_for(cfg, getattr(transformers, decoder_class))
    if attention not in ATTENTION:
        raise ValueError(f"reference attention {attention!r}: use one of {', '.join(ATTENTION)}")
    cfg._attn_implementation = attention
    return cfg


def _drop_parameters(module, args, output) -> None:
    """A streamed layer's weights back to the meta device once it has run (its buffers, such as
    rotary tables, stay)."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None and not p.is_meta:
                sub._parameters[name] = torch.nn.Parameter(p.to("meta"), requires_grad=False)
    # Freed, but kept by the heap unless handed back: the freed layers would otherwise pile up
    # (glibc serves allocations of this size from its heap once one such block has been freed).
    trim_heap()


def slice_decoder(decoder, first: int, last: int, final_norm: bool):
    """transformers' decoder restricted to layers ``first``..``last - 1`` (the final norm only when
    ``final_norm``).

    A shallow copy with its own module table: the layers (and their weights) are shared,
    and each keeps its ``layer_idx``, so it updates its own slot of the DynamicCache.
    """
    if first == 0 and last == len(decoder.layers) and final_norm:
        return decoder
    sub = copy.copy(decoder)
    sub._modules = dict(decoder._modules)
    sub._modules["layers"] = torch.nn.ModuleList(list(decoder.layers)[first:last])
    if not final_norm:
        sub._modules["norm"] = torch.nn.Identity()
    return sub


@dataclass
class StepResult:
    hidden: torch.Tensor
    past: list[torch.Tensor]        # [k0, v0, k1, v1, ...], [B, kv_heads, sumN, head_dim]


class HFReference:
    """transformers' decoder (the family's class) holding ``source``'s weights in ``dtype``.

    ``layers``: only those layers (and the final norm when ``norm``) hold weights; the model is
    built on the meta device and every other layer stays there, taking no memory, so
    validation can hold a few layers at a time (slice_decoder runs just those).

    ``stream_layers``: the layers hold no weights between calls either. Each reads its own from
    the source when it is called and lets them go when it returns, so transformers' whole model
    (its own forward, embedding to logits) runs holding one layer beside the embedding and the
    head: for a few forward passes (each reads every layer again), not for many small steps.
    """

    def __init__(self, source: ModelSource, dtype: torch.dtype = torch.float32, with_lm: bool = False,
                 attention: str | None = None, layers: range | None = None, norm: bool = True,
                 round_to: torch.dtype | None = None, stream_layers: bool = False):
        """``attention``: transformers' attention implementation (None: ``attention_for``'s choice).
        ``round_to``: the weights rounded to this dtype first (a float32 model of an fp16 graph's
        own weights)."""
        self.source, self.dtype, self.round_to = source, dtype, round_to
        self.layers = range(source.config.num_layers) if layers is None else layers
        held = range(0) if stream_layers else self.layers
        self.hf_config = _hf_config(source, attention)
        self.attention = self.hf_config._attn_implementation
        decoder_class, lm_class = get_family(source.config.family).reference_classes
        cls = getattr(transformers, lm_class if with_lm else decoder_class)
        # Every parameter is replaced below: never write random ones, nor allocate them.
        with torch.device("meta"), no_init_weights():
            model = cls._from_config(self.hf_config, dtype=dtype)
        prefix = "model." if with_lm else ""
        if with_lm:
            if source.read_lm is None:
                raise ValueError(f"{source.name}: no LM head in this model source")
            # First, while little else is held; no name keeps a source tensor beyond its conversion.
            embed = source.read_lm(["embed_tokens.weight"])
            self._assign(model, {"model.embed_tokens.weight": embed.pop("embed_tokens.weight")}, "")
            head = source.read_lm(["lm_head.weight"])
            if self._converts_to(head["lm_head.weight"], model.get_input_embeddings().weight):
                # Tied (SmolLM2, Llama 3.2, Qwen2): one matrix for both, as transformers ties them, not
                # a second vocabulary-sized float32 copy (1 GiB for Llama 3.2 1B).
                model.lm_head.weight = model.get_input_embeddings().weight
            else:
                self._assign(model, head, "")
            del embed, head
        # Read and converted a layer at a time: one layer in the source's dtype beside the model.
        for i in held:
            self._assign(model, source.read_reference(layers=range(i, i + 1), norm=False), prefix)
        if norm:
            self._assign(model, source.read_reference(layers=range(0), norm=True), prefix)
        self._materialize_rotary(model)
        if with_lm:
            _materialize_buffers(model, model.get_input_embeddings())
        else:
            # Fed embeddings, never token ids: an empty table rather than a meta one (the model can
            # still be moved to a device) or a vocabulary-sized one of zeros.
            model.embed_tokens = torch.nn.Embedding(0, source.config.hidden_size, dtype=dtype)
        # Rotary inverse frequencies stay fp32, as from_pretrained(dtype=float16) leaves
        # them: a blanket .to(float16) would round them and shift the angle by ~1 rad
        # at position 4000, which is a bug of the reference, not of the graph under test.
        keep = {n: b.clone() for n, b in model.named_buffers() if n.endswith("inv_freq")}
        model = model.to(dtype)
        for name, buf in keep.items():
            owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(owner, name.rsplit(".", 1)[-1], buf)
        self.model = model.eval()
        self._check_loaded(held, norm, with_lm)
        if stream_layers:
            for i in self.layers:
                self.decoder.layers[i].register_forward_pre_hook(functools.partial(self._load_layer, i, prefix))
                self.decoder.layers[i].register_forward_hook(_drop_parameters)
        self._cache_kw = "cache" if "cache" in inspect.signature(self.decoder.forward).parameters else "past_key_values"

    def _assign(self, model, weights: dict, prefix: str) -> None:
        state = {}
        for k in list(weights):          # popped as converted: one tensor in the source's dtype at a time
            v = weights.pop(k)
            state[prefix + k] = self._converted(v)
            del v
        # assign: the modules take these tensors as their parameters (no second copy of the weights).
        result = model.load_state_dict(state, strict=False, assign=True)
        if result.unexpected_keys:
            raise ValueError(f"{self.source.name}: the reference model has no tensor {result.unexpected_keys[0]!r}")

    def _pieces(self, v: torch.Tensor):
        """(start, piece): ``v`` flattened, a few MB at a time, rounded to ``round_to`` and cast to the
        model's dtype."""
        src = v.reshape(-1)
        for start in range(0, src.numel(), CONVERT_CHUNK):
            piece = src[start:start + CONVERT_CHUNK]
            yield start, (piece.to(self.round_to) if self.round_to else piece).to(self.dtype)

    def _converted(self, v: torch.Tensor) -> torch.Tensor:
        """``v`` converted piece by piece into the result: the source's tensor and the result are
        held, not a whole rounded copy between them (a vocabulary-sized float32 embedding: 544 MiB
        on the Qwen2-0.5B shape)."""
        if v.dtype == self.dtype and self.round_to is None:
            return v
        out = torch.empty(v.shape, dtype=self.dtype)
        dst = out.view(-1)
        for start, piece in self._pieces(v):
            dst[start:start + piece.numel()] = piece
        return out

    def _converts_to(self, v: torch.Tensor, held: torch.Tensor) -> bool:
        """Whether ``v`` converted equals ``held``, compared piece by piece (two matrices equal after
        rounding give the same model tied or not)."""
        if v.shape != held.shape:
            return False
        have = held.reshape(-1)
        return all(torch.equal(piece, have[start:start + piece.numel()]) for start, piece in self._pieces(v))

    def _materialize_rotary(self, model) -> None:
        """The rotary embedding's buffers are computed from the config at construction, which ran on
        the meta device: construct it again, for real."""
        for name, module in list(model.named_modules()):
            if type(module).__name__.endswith("RotaryEmbedding") and any(b.is_meta for b in module.buffers()):
                owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
                setattr(owner, name.rsplit(".", 1)[-1], type(module)(config=self.hf_config))

    def _load_layer(self, i: int, prefix: str, module, args) -> None:
        """A streamed layer's weights, read just before it runs."""
        self._assign(self.model, self.source.read_reference(layers=range(i, i + 1), norm=False), prefix)
        self._check_held([(f"layers.{i}", module)])

    def _check_loaded(self, held: range, norm: bool, with_lm: bool) -> None:
        """Everything the held layers run holds real values (a checkpoint without a tensor the
        config asks for would otherwise leave it on the meta device)."""
        dec = self.decoder
        parts = [(f"layers.{i}", dec.layers[i]) for i in held]
        parts += [(n, m) for n, m in dec.named_children() if n not in ("layers", "embed_tokens", "norm")]
        if norm:
            parts.append(("norm", dec.norm))
        if with_lm:
            parts += [("embed_tokens", dec.embed_tokens), ("lm_head", self.model.lm_head)]
        self._check_held(parts)

    def _check_held(self, parts) -> None:
        for base, module in parts:
            for n, t in list(module.named_parameters()) + list(module.named_buffers()):
                if t.is_meta:
                    raise ValueError(f"{self.source.name}: the checkpoint holds no value for the reference's "
                                     f"{base}.{n}")

    @property
    def decoder(self):
        return getattr(self.model, "model", self.model) if hasattr(self.model, "lm_head") else self.model

    def new_cache(self):
        # Full layers, never transformers' sliding-window ones (which keep only the window's
        # rows): validation feeds the cache as the graphs' past and passes masks over every
        # row, with the window in the mask, as kvplan's graphs take it.
        return DynamicCache()

    @staticmethod
    def cache_tensors(cache, layers) -> list[torch.Tensor]:
        """[k, v] of each of ``layers`` (an int: the first that many)."""
        out = []
        for i in (range(layers) if isinstance(layers, int) else layers):
            if hasattr(cache, "layers"):
                k, v = cache.layers[i].keys, cache.layers[i].values
            else:
                k, v = cache.key_cache[i], cache.value_cache[i]
            out += [k.clone(), v.clone()]
        return out

    @torch.no_grad()
    def step(self, hidden: torch.Tensor, mask: torch.Tensor | None, position_ids: torch.Tensor, cache) -> StepResult:
        """Run N new tokens (embeddings ``hidden``) on top of ``cache`` (updated in place)."""
        out = self.decoder(inputs_embeds=hidden.to(self.dtype),
                           attention_mask=None if mask is None else mask.to(self.dtype),
                           position_ids=position_ids, use_cache=True, **{self._cache_kw: cache})
        return StepResult(out.last_hidden_state, self.cache_tensors(cache, self.source.config.num_layers))

    @torch.no_grad()
    def prefill(self, hidden: torch.Tensor):
        """A real prefill of the embeddings ``hidden`` [B, length, hidden] (the caller's: the reference
        never makes up its inputs): returns the filled cache."""
        cache = self.new_cache()
        batch, length = hidden.shape[:2]
        if length == 0:
            return cache
        pos = torch.arange(length)[None].expand(batch, length)
        self.step(hidden, None, pos, cache)
        return cache


def _materialize_buffers(model, module) -> None:
    """Give ``module``'s buffers that its constructor computed on the meta device (Gemma 2's
    embed_scale) the values transformers' own initialisation gives them; its parameters (the
    checkpoint's, already assigned) are kept."""
    meta = [name for name, b in module.named_buffers(recurse=False) if b.is_meta]
    if not meta:
        return
    params = dict(module.named_parameters(recurse=False))
    # The initialiser writes every tensor of the module: it gets scratch parameters to write.
    for name, param in params.items():
        setattr(module, name, torch.nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=False))
    for name in meta:
        module._buffers[name] = torch.empty_like(module._buffers[name], device="cpu")
    model._init_weights(module)
    for name, param in params.items():
        setattr(module, name, param)


def reference_embedding(source: ModelSource, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """transformers' own input embedding of the family's decoder (Gemma 2's scaled by
    √hidden_size, as its model does), holding ``source``'s embedding matrix: token ids in,
    the ``hidden_in`` a runtime feeds the decoder out."""
    if source.read_embedding is None:
        raise ValueError(f"{source.name}: the model source has no input embedding matrix")
    weight = source.read_embedding()
    cfg = _hf_config(source)
    # The matrix's own rows (MiniCPM-o's text embedding is not the config's vocabulary).
    cfg.vocab_size = weight.shape[0]
    decoder_class = get_family(source.config.family).reference_classes[0]
    with torch.device("meta"), no_init_weights():
        model = getattr(transformers, decoder_class)._from_config(cfg, dtype=dtype)
    module = model.get_input_embeddings()
    module.load_state_dict({"weight": weight.to(dtype)}, strict=False, assign=True)
    _materialize_buffers(model, module)
    return module.eval()
