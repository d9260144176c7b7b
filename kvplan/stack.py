"""Which slice of the decoder a graph covers, and how a profile cuts the stack into packs: plain
data, for the stages that decide and name things without building the decoder (kvplan.decoder)."""
from __future__ import annotations

from dataclasses import dataclass

from kvplan.config import DecoderConfig


@dataclass(frozen=True)
class StackSpec:
    """Which slice of the decoder an exported graph covers, and how its cache is laid out."""
    first_layer: int
    last_layer: int          # exclusive
    final_norm: bool
    kv_format: int = 0       # 0: [B, kv_heads, S, head_dim]; 1: [B, S, kv_heads, head_dim]
    # "concat": outputs the whole cache (past + new rows, length sumN), the original contract;
    # "delta": outputs only the N new rows, for runtimes that append into a preallocated buffer;
    # "inplace": the cache inputs are that buffer (cache_len rows), the step writes its N rows
    # into it at write_indices and attends over the whole buffer (TensorRT updates it in place).
    kv_io: str = "concat"
    cache_len: int = 0       # inplace only: rows of the preallocated buffer

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer)


KV_IO_MODES = ("concat", "delta", "inplace")


def export_specs(cfg: DecoderConfig, export) -> list[StackSpec]:
    """The packs a profile's ``[export]`` section (kvplan.profiles.Export) cuts ``cfg``'s layers into."""
    return pack_specs(cfg, export.decoder_pack_size, export.kv_format, export.kv_io, export.cache_len)


def pack_specs(cfg: DecoderConfig, pack_size: int, kv_format: int = 0, kv_io: str = "concat",
               cache_len: int = 0) -> list[StackSpec]:
    """Split the stack into packs of ``pack_size`` layers (0: one pack); only the last one has the final norm."""
    if pack_size < 0:
        raise ValueError(f"decoder_pack_size must be >= 0, got {pack_size}")
    size = pack_size or cfg.num_layers
    starts = list(range(0, cfg.num_layers, size))
    if kv_io not in KV_IO_MODES:
        raise ValueError(f"kv_io must be one of {', '.join(KV_IO_MODES)}, got {kv_io!r}")
    if kv_io == "inplace":
        if kv_format != 0:
            raise ValueError("kv_io = inplace needs kv_format 0: TensorRT's KV-cache update layer takes "
                             "the cache as [B, kv_heads, S, head_dim]")
        if not 0 < cache_len <= cfg.max_position_embeddings:
            raise ValueError(f"kv_io = inplace needs 0 < cache_len <= max positions ({cfg.max_position_embeddings}), "
                             f"got {cache_len}")
    else:
        cache_len = 0
    return [StackSpec(s, min(s + size, cfg.num_layers), s + size >= cfg.num_layers, kv_format, kv_io, cache_len)
            for s in starts]


def input_names(spec: StackSpec) -> list[str]:
    names = ["hidden_in", "attention_mask", "position_ids"]
    if spec.kv_io == "inplace":
        names.append("write_indices")
    for i in spec.layers:
        names += [f"past_key_in{i}", f"past_value_in{i}"]
    return names


def output_names(spec: StackSpec) -> list[str]:
    # delta outputs are named present_*: they are not the next step's past, only its new rows.
    kind = "present" if spec.kv_io == "delta" else "past"
    names = ["hidden_out"]
    for i in spec.layers:
        names += [f"{kind}_key{i}", f"{kind}_value{i}"]
    return names


def kv_shape(cfg: DecoderConfig, spec: StackSpec, batch: int | str, length: int | str) -> list:
    if spec.kv_format == 1:
        return [batch, length, cfg.num_kv_heads, cfg.head_dim]
    return [batch, cfg.num_kv_heads, length, cfg.head_dim]


def io_contract(cfg: DecoderConfig, spec: StackSpec, batch: int | str, dtype: str) -> dict[str, dict]:
    """Name -> {shape, dtype} of every input and output, with symbolic axes as strings.

    ``batch``: the static batch size, or "B" (a profile's batch range: Export.batch_dim).

    kv_io = "inplace": the cache inputs and outputs are the preallocated buffer of
    ``spec.cache_len`` rows (a static axis: TensorRT's in-place update needs one), the mask
    covers the whole buffer, and ``write_indices`` [B] says where each row's N new
    rows go (its lastSum).
    """
    inplace = spec.kv_io == "inplace"
    io = {
        "inputs": {
            "hidden_in": {"shape": [batch, "N", cfg.hidden_size], "dtype": dtype},
            "attention_mask": {"shape": [batch, 1, "N", spec.cache_len if inplace else "sumN"], "dtype": dtype},
            "position_ids": {"shape": [batch, "N"], "dtype": "int64"},
        },
        "outputs": {"hidden_out": {"shape": [batch, "N", cfg.hidden_size], "dtype": dtype}},
    }
    if inplace:
        io["inputs"]["write_indices"] = {"shape": [batch], "dtype": "int64"}
    out_names = iter(output_names(spec)[1:])
    past_len = spec.cache_len if inplace else "lastSum"
    out_len = {"delta": "N", "inplace": spec.cache_len}.get(spec.kv_io, "sumN")
    for i in spec.layers:
        for kind in ("key", "value"):
            io["inputs"][f"past_{kind}_in{i}"] = {"shape": kv_shape(cfg, spec, batch, past_len), "dtype": dtype}
            io["outputs"][next(out_names)] = {"shape": kv_shape(cfg, spec, batch, out_len), "dtype": dtype}
    return io


def pack_file_names(n_packs: int, stem: str = "decoder", suffix: str = ".onnx") -> list[str]:
    """decoder.onnx for one pack; decoder.pack0.onnx, decoder.pack1.onnx, ... otherwise."""
    if n_packs == 1:
        return [f"{stem}{suffix}"]
    return [f"{stem}.pack{i}{suffix}" for i in range(n_packs)]


def _linear(out: dict, name: str, n_in: int, n_out: int, bias: bool) -> None:
    out[f"{name}.weight"] = (n_out, n_in)
    if bias:
        out[f"{name}.bias"] = (n_out,)


def layer_tensor_shapes(cfg: DecoderConfig, i: int) -> dict[str, tuple[int, ...]]:
    """Layer ``i``'s tensors of kvplan's decoder (kvplan.decoder.DecoderLayer) in its state_dict's
    order, Hugging Face's names: what the decoder module holds, without building it (a test holds
    the two equal for every preset)."""
    h, d, inter = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    p, out = f"layers.{i}.", {}
    _linear(out, p + "self_attn.q_proj", h, cfg.num_heads * d, cfg.qkv_bias)
    _linear(out, p + "self_attn.k_proj", h, cfg.num_kv_heads * d, cfg.qkv_bias)
    _linear(out, p + "self_attn.v_proj", h, cfg.num_kv_heads * d, cfg.qkv_bias)
    _linear(out, p + "self_attn.o_proj", cfg.num_heads * d, h, cfg.o_bias)
    if cfg.qk_norm:
        out[p + "self_attn.q_norm.weight"] = out[p + "self_attn.k_norm.weight"] = (d,)
    for name, n_in, n_out in (("gate_proj", h, inter), ("up_proj", h, inter), ("down_proj", inter, h)):
        _linear(out, f"{p}mlp.{name}", n_in, n_out, cfg.mlp_bias)
    norms = ["input_layernorm", "post_attention_layernorm"]
    norms += ["pre_feedforward_layernorm", "post_feedforward_layernorm"] if cfg.sandwich_norm else []
    out.update({f"{p}{n}.weight": (h,) for n in norms})
    return out


def tensor_shapes(cfg: DecoderConfig, spec: StackSpec | None = None) -> dict[str, tuple[int, ...]]:
    """The tensors of the stack ``spec`` covers (default: every layer and the final norm)."""
    spec = spec or StackSpec(0, cfg.num_layers, True)
    out: dict[str, tuple[int, ...]] = {}
    for i in spec.layers:
        out.update(layer_tensor_shapes(cfg, i))
    if spec.final_norm:
        out["norm.weight"] = (cfg.hidden_size,)
    return out
