"""kvplan's own Llama-family decoder stack in torch: the PyTorch side of validation.

The exporter writes the ONNX graph op by op (kvplan/export/emit.py); this module computes the
same arithmetic eagerly, spelled independently, and validation and the tests hold the graphs to
it (and both to transformers, the independent reference).

The family switches (DecoderConfig's fields) pick the variant: GeGLU or SwiGLU, sandwich
norms, soft-capped logits, biases, q/k norm, partial rotary. Norm gains of the
(1 + w) kind (Gemma) are folded into the weights when a checkpoint is read
(kvplan/models/families/gemma2.py), so every norm here is the one plain RMSNorm.

Why not run transformers' modules here: their cache and attention plumbing changes between
releases. This module spells every op one stable way (RMSNorm as pow/mean/rsqrt in fp32, RoPE
as rotate_half on a cos/sin pair computed once per step), as the graph does.

Parameter names are Hugging Face's (``layers.{i}.self_attn.q_proj.weight``, ...),
so a checkpoint's tensors load by name.
"""
from __future__ import annotations

from torch import nn

from kvplan.config import DecoderConfig, inv_freq
from kvplan.kv_write import kv_write
from kvplan.lazy import lazy_import
from kvplan.stack import KV_IO_MODES, StackSpec, export_specs, pack_specs  # noqa: F401  (re-exported)

torch = lazy_import("torch")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The variance is taken in fp32 whatever the model dtype: fp16 overflows on
        # x**2 for activations above ~256.
        dtype = x.dtype
        x = x.to(torch.float32)
        var = x.pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(var + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((x_rot * cos + rotate_half(x_rot) * sin, x_pass), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = nn.Linear(h, cfg.num_heads * d, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, cfg.num_kv_heads * d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * d, h, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)

    def forward(self, x, mask, cos, sin, past_k, past_v, kv_io: str = "concat", write_indices=None):
        cfg = self.cfg
        b, n, _ = x.shape
        d = cfg.head_dim
        q = self.q_proj(x).view(b, n, cfg.num_heads, d)
        k = self.k_proj(x).view(b, n, cfg.num_kv_heads, d)
        v = self.v_proj(x).view(b, n, cfg.num_kv_heads, d).transpose(1, 2)
        if cfg.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        q = apply_rotary(q, cos, sin, cfg.rotary_dim)
        k = apply_rotary(k, cos, sin, cfg.rotary_dim)
        new_k, new_v = k, v
        if kv_io == "inplace":
            # The buffer's rows past lastSum + N hold stale data; the mask hides them.
            k = kv_write(past_k, k, write_indices, 2)
            v = kv_write(past_v, v, write_indices, 2)
        else:
            # The cache is concatenated explicitly: the exported graph owns its KV I/O.
            k = torch.cat((past_k, k), dim=2)
            v = torch.cat((past_v, v), dim=2)
        out_k, out_v = (new_k, new_v) if kv_io == "delta" else (k, v)
        rep = cfg.num_heads // cfg.num_kv_heads
        if rep > 1:
            s = k.shape[2]
            k = k[:, :, None].expand(b, cfg.num_kv_heads, rep, s, d).reshape(b, cfg.num_heads, s, d)
            v = v[:, :, None].expand(b, cfg.num_kv_heads, rep, s, d).reshape(b, cfg.num_heads, s, d)
        scores = torch.matmul(q, k.transpose(2, 3)) * cfg.scale
        if cfg.attn_softcap:
            # Gemma 2 caps the logits before the mask is added (the order matters: a capped
            # mask would no longer mask).
            scores = torch.tanh(scores / cfg.attn_softcap) * cfg.attn_softcap
        scores = scores + mask
        # Softmax in fp32 as transformers' eager attention does; fp16 sums of
        # exponentials lose the long tail. Spelled as an explicit cast: the exporter
        # lowers softmax(dtype=float32) to an fp16 Softmax followed by a Cast.
        probs = torch.softmax(scores.to(torch.float32), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(b, n, cfg.num_heads * d)
        return self.o_proj(out), out_k, out_v


class MLP(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(h, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, h, bias=cfg.mlp_bias)
        self.act = cfg.hidden_act

    def forward(self, x):
        gate = self.gate_proj(x)
        if self.act == "gelu_pytorch_tanh":
            gate = nn.functional.gelu(gate, approximate="tanh")     # GeGLU (Gemma)
        else:
            gate = nn.functional.silu(gate)                         # SwiGLU
        return self.down_proj(gate * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.sandwich = cfg.sandwich_norm
        if cfg.sandwich_norm:
            # Gemma 2: post_attention_layernorm normalizes the attention output, and the MLP
            # has its own norms before and after (Hugging Face's names).
            self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
            self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, mask, cos, sin, past_k, past_v, kv_io: str = "concat", write_indices=None):
        attn, k, v = self.self_attn(self.input_layernorm(x), mask, cos, sin, past_k, past_v, kv_io, write_indices)
        if self.sandwich:
            x = x + self.post_attention_layernorm(attn)
            x = x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))
            return x, k, v
        x = x + attn
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k, v


class RotaryCosSin(nn.Module):
    """cos/sin [B, 1, N, rotary_dim] for the step's positions, computed once and shared by every layer."""

    def __init__(self, cfg: DecoderConfig, dtype: torch.dtype):
        super().__init__()
        freqs, self.attention_scaling = inv_freq(cfg)
        self.dtype = dtype
        self.register_buffer("inv_freq", torch.tensor(freqs, dtype=torch.float32), persistent=False)

    def forward(self, position_ids: torch.Tensor):
        # In fp32, then cast to the model dtype, as transformers does.
        freqs = position_ids[:, :, None].to(torch.float32) * self.inv_freq[None, None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = (emb.cos() * self.attention_scaling).to(self.dtype)[:, None]
        sin = (emb.sin() * self.attention_scaling).to(self.dtype)[:, None]
        return cos, sin


class LayerStep(nn.Module):
    """One decoder layer over the cache layout and I/O mode of the export."""

    def __init__(self, layer: DecoderLayer, kv_format: int, kv_io: str = "concat"):
        super().__init__()
        self.layer, self.kv_format, self.kv_io = layer, kv_format, kv_io

    def forward(self, x, mask, cos, sin, past_k, past_v, write_indices=None):
        if self.kv_format == 1:
            past_k, past_v = past_k.transpose(1, 2), past_v.transpose(1, 2)
        x, k, v = self.layer(x, mask, cos, sin, past_k, past_v, self.kv_io, write_indices)
        if self.kv_format == 1:
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        return x, k, v


class DecoderStack(nn.Module):
    """Layers ``spec.layers`` of the decoder (and the final norm if ``spec.final_norm``).

    forward(hidden_in, attention_mask, position_ids, past_key_in{i}, past_value_in{i}, ...)
    -> (hidden_out, past_key{i}, past_value{i}, ...), the I/O contract of DESIGN.md;
    kv_io = "inplace" takes write_indices after position_ids.
    """

    def __init__(self, cfg: DecoderConfig, spec: StackSpec, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg, self.spec = cfg, spec
        # ModuleDict keyed by the global layer index, so parameter names match the
        # checkpoint's ("layers.7.mlp...") in every pack.
        self.layers = nn.ModuleDict({str(i): DecoderLayer(cfg) for i in spec.layers})
        if spec.final_norm:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryCosSin(cfg, dtype)

    def steps(self):
        return [LayerStep(layer, self.spec.kv_format, self.spec.kv_io) for layer in self.layers.values()]

    def forward(self, hidden_in, attention_mask, position_ids, *past):
        write_indices = None
        if self.spec.kv_io == "inplace":
            write_indices, *past = past
        cos, sin = self.rotary(position_ids)
        x = hidden_in
        outputs = []
        for j, step in enumerate(self.steps()):
            x, k, v = step(x, attention_mask, cos, sin, past[2 * j], past[2 * j + 1], write_indices)
            outputs += [k, v]
        if self.spec.final_norm:
            x = self.norm(x)
        return (x, *outputs)
