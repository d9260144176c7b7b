"""Write a pack's decoder graph op by op, from the config and the weights: no tracer.

Each op is spelled as kvplan's torch module (kvplan/decoder.py) computes it, and as the
surgery passes match it: RMSNorm as Pow/ReduceMean/Add/Sqrt/Reciprocal/Mul in float32
between two Casts, RoPE as rotate_half on one cos/sin pair per step, the attention core as
MatMul/Mul/Add/Softmax (float32)/MatMul with the GQA repetition as Unsqueeze/Expand/Reshape.
The torch module stays the PyTorch side of validation, and transformers the independent
reference of the tests; this module is a second, independent spelling of the same arithmetic.

Why not trace: the tracer costs seconds of imports and seconds a trace whatever the size of
the model, for a graph whose every op is known in advance (the best exporters write the graph
directly). Writing it costs milliseconds a layer, and the bytes depend on nothing but the
config, the spec, the dtype and the weights.

Each linear's MatMul reads its weight transposed (W^T [in, out], the initializer
``<name>.T``) and carries the weight's name under LINEAR_MARK, where the quantize stage
finds it. Node names start with ``rotary/``, ``layers.{i}/`` or ``norm/`` (validation cuts
layer ranges by them).
"""
from __future__ import annotations

import numpy as np

from kvplan.config import DecoderConfig, inv_freq
from kvplan.lazy import lazy_import
from kvplan.stack import StackSpec

ir = lazy_import("onnx_ir")
ml_dtypes = lazy_import("ml_dtypes")

OPSET = 23
INPLACE_OPSET = 24            # TensorScatter's first version
# A MatMul that computes a linear of the model (x @ W^T) carries W's name under this metadata key,
# in the file: the quantize stage finds each linear by it. Which initializers hold equal values
# says nothing about which layer a weight belongs to (a trained checkpoint's layers can share
# equal norm gains, zero biases, even whole layers).
LINEAR_MARK = "kvplan.weight"
INT64_MAX = np.iinfo(np.int64).max

_NP = {"float32": np.float32, "float16": np.float16}


class Emitter:
    """One graph under construction: nodes named by scope, small constants shared by value."""

    def __init__(self, inputs: list, dtype: str, opset: int):
        self.graph = ir.Graph(inputs, [], nodes=[], opset_imports={"": opset}, name="kvplan_decoder")
        self.dtype = dtype
        self.float = ir.DataType.FLOAT
        self.type = {"float32": ir.DataType.FLOAT, "float16": ir.DataType.FLOAT16,
                     "bfloat16": ir.DataType.BFLOAT16}[dtype]
        self._consts: dict[tuple, ir.Value] = {}
        self._counts: dict[str, int] = {}
        self.scope = ""

    def op(self, op_type: str, *inputs, out_type=None, mark: str | None = None, **attrs) -> ir.Value:
        """Append one single-output node; its output has ``out_type`` (default: the first input's)."""
        key = f"{self.scope}{op_type}"
        n = self._counts.get(key, 0)
        self._counts[key] = n + 1
        name = f"{self.scope}{op_type}" + (f"_{n}" if n else "")
        node = ir.node(op_type, list(inputs), attrs or None, name=name,
                       metadata_props={LINEAR_MARK: mark} if mark else None)
        out = node.outputs[0]
        out.name = name
        out.type = ir.TensorType(out_type if out_type is not None else inputs[0].dtype)
        self.graph.append(node)
        return out

    def const(self, values, dtype=np.int64) -> ir.Value:
        """A small constant (shapes, axes, scalars), one initializer per distinct value."""
        array = np.asarray(values, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        value = self._consts.get(key)
        if value is None:
            value = self.initializer(f"const.{len(self._consts)}", ir.Tensor(array))
            self._consts[key] = value
        return value

    def scalar(self, x: float, dtype: str | None = None) -> ir.Value:
        """A scalar in the graph's dtype (or ``dtype``): what a torch op on a python float multiplies by."""
        dtype = dtype or self.dtype
        if dtype == "bfloat16":
            return self.const(np.float32(x).astype(ml_dtypes.bfloat16), ml_dtypes.bfloat16)
        return self.const(x, _NP[dtype])

    def initializer(self, name: str, tensor) -> ir.Value:
        value = ir.Value(name=name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype),
                         const_value=tensor)
        self.graph.register_initializer(value)
        return value

    # ------------------------------------------------------------------ building blocks

    def to_float(self, x):
        return x if self.dtype == "float32" else self.op("Cast", x, to=self.float, out_type=self.float)

    def to_model(self, x):
        return x if self.dtype == "float32" else self.op("Cast", x, to=self.type, out_type=self.type)

    def rms_norm(self, x, weight, eps: float):
        """weight * (x / sqrt(mean(x^2) + eps)), the variance in float32 whatever the model dtype."""
        x32 = self.to_float(x)
        var = self.op("ReduceMean", self.op("Pow", x32, self.const(2.0, np.float32)), self.const([-1]), keepdims=1)
        inv = self.op("Reciprocal", self.op("Sqrt", self.op("Add", var, self.const(eps, np.float32))))
        return self.op("Mul", weight, self.to_model(self.op("Mul", x32, inv)))

    def linear(self, x, weights: dict, name: str):
        """x @ W^T (+ b); W^T is the initializer ``<weight's name>.T``."""
        weight = weights[f"{name}.weight"]
        y = self.op("MatMul", x, weight, mark=weight.name.removesuffix(".T"))
        bias = weights.get(f"{name}.bias")
        return y if bias is None else self.op("Add", y, bias)


def rotary(e: Emitter, cfg: DecoderConfig, position_ids):
    """cos/sin [B, 1, N, rotary_dim] of the step's positions, in float32 then cast, once per step."""
    e.scope = "rotary/"
    freqs_list, scaling = inv_freq(cfg)
    freqs = np.asarray(freqs_list, dtype=np.float32)[None, None, :]
    pos = e.op("Cast", e.op("Unsqueeze", position_ids, e.const([2])), to=e.float, out_type=e.float)
    f = e.op("Mul", pos, e.initializer("rotary.inv_freq", ir.Tensor(freqs)))
    emb = e.op("Concat", f, f, axis=-1)
    out = []
    for fn in ("Cos", "Sin"):
        y = e.op(fn, emb)
        if scaling != 1.0:
            y = e.op("Mul", y, e.const(scaling, np.float32))
        out.append(e.op("Unsqueeze", e.to_model(y), e.const([1])))
    return out


def _rotate_half(e: Emitter, x, dim: int):
    half = dim // 2
    upper = e.op("Slice", x, e.const([half]), e.const([INT64_MAX]), e.const([3]), e.const([1]))
    lower = e.op("Slice", x, e.const([0]), e.const([half]), e.const([3]), e.const([1]))
    return e.op("Concat", e.op("Neg", upper), lower, axis=-1)


def _apply_rotary(e: Emitter, cfg: DecoderConfig, x, cos, sin):
    if cfg.rotary_dim == cfg.head_dim:
        return e.op("Add", e.op("Mul", x, cos), e.op("Mul", _rotate_half(e, x, cfg.head_dim), sin))
    rd = cfg.rotary_dim
    x_rot = e.op("Slice", x, e.const([0]), e.const([rd]), e.const([3]), e.const([1]))
    x_pass = e.op("Slice", x, e.const([rd]), e.const([INT64_MAX]), e.const([3]), e.const([1]))
    rotated = e.op("Add", e.op("Mul", x_rot, cos), e.op("Mul", _rotate_half(e, x_rot, rd), sin))
    return e.op("Concat", rotated, x_pass, axis=-1)


def _repeat_kv(e: Emitter, cfg: DecoderConfig, x, batch: int | str):
    """[B, KV, S, D] -> [B, H, S, D], each KV head repeated contiguously (kv head j serves q heads
    j*rep .. j*rep+rep-1), as torch's expand/reshape in the module and the attention pass read it."""
    rep = cfg.num_heads // cfg.num_kv_heads
    if rep == 1:
        return x
    expanded = e.op("Expand", e.op("Unsqueeze", x, e.const([2])), e.const([1, 1, rep, 1, 1]))
    tail = e.const([cfg.num_heads, -1, cfg.head_dim])
    if isinstance(batch, str):
        shape = e.op("Concat", e.op("Shape", x, start=0, end=1, out_type=ir.DataType.INT64), tail, axis=0)
    else:
        shape = e.const([batch, cfg.num_heads, -1, cfg.head_dim])
    return e.op("Reshape", expanded, shape)


def attention(e: Emitter, cfg: DecoderConfig, spec: StackSpec, batch, x, w: dict, mask, cos, sin,
              past_k, past_v, write_indices):
    """The attention block: its output [B, N, hidden] and the layer's K/V outputs."""
    h, kv, d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q = e.op("Reshape", e.linear(x, w, "self_attn.q_proj"), e.const([0, 0, h, d]))
    k = e.op("Reshape", e.linear(x, w, "self_attn.k_proj"), e.const([0, 0, kv, d]))
    v = e.op("Transpose", e.op("Reshape", e.linear(x, w, "self_attn.v_proj"), e.const([0, 0, kv, d])),
             perm=[0, 2, 1, 3])
    if cfg.qk_norm:
        q = e.rms_norm(q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = e.rms_norm(k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps)
    q = _apply_rotary(e, cfg, e.op("Transpose", q, perm=[0, 2, 1, 3]), cos, sin)
    k = _apply_rotary(e, cfg, e.op("Transpose", k, perm=[0, 2, 1, 3]), cos, sin)
    if spec.kv_format == 1:
        past_k = e.op("Transpose", past_k, perm=[0, 2, 1, 3])
        past_v = e.op("Transpose", past_v, perm=[0, 2, 1, 3])
    if spec.kv_io == "inplace":
        # The buffer's rows past lastSum + N hold stale data; the mask hides them.
        keys = e.op("TensorScatter", past_k, k, write_indices, axis=2, mode="linear")
        values = e.op("TensorScatter", past_v, v, write_indices, axis=2, mode="linear")
    else:
        keys, values = e.op("Concat", past_k, k, axis=2), e.op("Concat", past_v, v, axis=2)
    out_k, out_v = (k, v) if spec.kv_io == "delta" else (keys, values)
    if spec.kv_format == 1:
        out_k, out_v = e.op("Transpose", out_k, perm=[0, 2, 1, 3]), e.op("Transpose", out_v, perm=[0, 2, 1, 3])
    keys, values = _repeat_kv(e, cfg, keys, batch), _repeat_kv(e, cfg, values, batch)
    scores = e.op("Mul", e.op("MatMul", q, e.op("Transpose", keys, perm=[0, 1, 3, 2])), e.scalar(cfg.scale))
    if cfg.attn_softcap:
        # Gemma 2 caps the logits before the mask is added (a capped mask would no longer mask).
        cap = e.scalar(cfg.attn_softcap)
        scores = e.op("Mul", e.op("Tanh", e.op("Div", scores, cap)), cap)
    scores = e.op("Add", scores, mask)
    # Softmax in float32 as transformers' eager attention does: fp16 sums of exponentials lose the tail.
    probs = e.to_model(e.op("Softmax", e.to_float(scores), axis=-1))
    out = e.op("Transpose", e.op("MatMul", probs, values), perm=[0, 2, 1, 3])
    out = e.op("Reshape", out, e.const([0, 0, h * d]))
    return e.linear(out, w, "self_attn.o_proj"), out_k, out_v


def mlp(e: Emitter, cfg: DecoderConfig, x, w: dict):
    gate = e.linear(x, w, "mlp.gate_proj")
    if cfg.hidden_act == "gelu_pytorch_tanh":
        gate = e.op("Gelu", gate, approximate="tanh")                 # GeGLU (Gemma)
    else:
        gate = e.op("Mul", gate, e.op("Sigmoid", gate))                # SwiGLU
    return e.linear(e.op("Mul", gate, e.linear(x, w, "mlp.up_proj")), w, "mlp.down_proj")


def layer(e: Emitter, cfg: DecoderConfig, spec: StackSpec, batch, index: int, x, w: dict, mask, cos, sin,
          past_k, past_v, write_indices=None):
    """Decoder layer ``index``: (hidden, K out, V out). ``w``: the layer's weights by their name
    within the layer (``self_attn.q_proj.weight`` bound transposed, ``input_layernorm.weight``)."""
    e.scope = f"layers.{index}/"
    eps = cfg.rms_norm_eps
    attn, k, v = attention(e, cfg, spec, batch, e.rms_norm(x, w["input_layernorm.weight"], eps), w, mask, cos, sin,
                           past_k, past_v, write_indices)
    if cfg.sandwich_norm:
        # Gemma 2: post_attention_layernorm normalizes the attention output; the MLP has its own
        # norms before and after.
        x = e.op("Add", x, e.rms_norm(attn, w["post_attention_layernorm.weight"], eps))
        y = mlp(e, cfg, e.rms_norm(x, w["pre_feedforward_layernorm.weight"], eps), w)
        return e.op("Add", x, e.rms_norm(y, w["post_feedforward_layernorm.weight"], eps)), k, v
    x = e.op("Add", x, attn)
    return e.op("Add", x, mlp(e, cfg, e.rms_norm(x, w["post_attention_layernorm.weight"], eps), w)), k, v


def final_norm(e: Emitter, cfg: DecoderConfig, x, weight):
    e.scope = "norm/"
    return e.rms_norm(x, weight, cfg.rms_norm_eps)
