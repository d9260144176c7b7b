"""ONNX graphs of MiniCPM-o 2.6's TTS audio ends (ConditionalChatTTS, the checkpoint's modeling_minicpmo.py).

    embed_audio.onnx  audio_ids [B, N, num_vq] int64 -> sum over codebooks i of emb_code[i][audio_ids[..., i]]
                      -> hidden_in [B, N, hidden]
    head_audio.onnx   hidden_out [B, N, hidden] -> (last row) -> MatMul(all codebooks' W^T at once) -> Reshape
                      -> audio_logits [B, N|1, num_audio_tokens, num_vq]

What ConditionalChatTTS does, and these graphs do the same:
- An audio step's input embedding is ``torch.stack([emb_code[i](ids[:, :, i]) for i in range(num_vq)], 3).sum(3)``
  (ConditionalChatTTS.prefill_audio_ids and .generate). In float16/bfloat16 torch sums the stacked
  codebooks in float32 and rounds once, so the graph casts the gathered rows to float32, sums, and
  casts back (four float16 additions would round three times more).
- ``head_code[i]`` is ``weight_norm(nn.Linear(hidden, num_audio_tokens, bias=False))``; .generate fills
  ``logits = torch.empty(B, N, num_audio_tokens, num_vq)`` with ``logits[..., i] = head_code[i](hidden)``:
  the codebook is the last axis. (That buffer is float32, so torch's logits are the model dtype's
  values upcast; the graph's are those values in the profile dtype, which a runtime upcasts as it likes.)
- W = g * v / ||v|| (the norm over each output row), folded here in float32 as torch's
  _weight_norm computes it (v * (g / ||v||) with a float32 accumulator) and rounded once to the
  profile dtype.
"""
from __future__ import annotations

import numpy as np

from kvplan.embed_head.graphs import INT64_MAX, ONNX_DTYPES, Graph, _const, _contract, _model, _np, _value
from kvplan.lazy import lazy_import

ir = lazy_import("onnx_ir")
torch = lazy_import("torch")


def audio_embed_graph(tables: list[torch.Tensor], dtype: str, batch: int | str) -> Graph:
    """``audio_ids`` [B, N, num_vq] -> ``hidden_in`` [B, N, hidden]: the sum over codebooks i of row
    ``audio_ids[..., i]`` of ``tables[i]`` [num_audio_tokens, hidden], summed in float32 and rounded
    once to ``dtype``."""
    num_vq = len(tables)
    hidden = tables[0].shape[1]
    float_type = ONNX_DTYPES[dtype]
    ids = _value("audio_ids", ir.DataType.INT64, [batch, "N", num_vq])
    nodes: list = []
    inits: list = []
    rows = []
    for i, table in enumerate(tables):
        weight = _const(f"emb_code.{i}.weight", _np(table, dtype))
        index = _const(f"embed_audio/codebook_{i}", np.array(i, dtype=np.int64))
        pick = ir.node("Gather", [ids, index], attributes={"axis": 2}, name=f"embed_audio/ids_{i}")
        gather = ir.node("Gather", [weight, pick.outputs[0]], attributes={"axis": 0}, name=f"embed_audio/gather_{i}")
        nodes += [pick, gather]
        inits += [weight, index]
        row = gather.outputs[0]
        if float_type != ir.DataType.FLOAT:
            up = ir.node("Cast", [row], attributes={"to": ir.DataType.FLOAT}, name=f"embed_audio/float_{i}")
            nodes.append(up)
            row = up.outputs[0]
        rows.append(row)
    total = ir.node("Sum", rows, name="embed_audio/sum")
    nodes.append(total)
    out = total.outputs[0]
    if float_type != ir.DataType.FLOAT:
        down = ir.node("Cast", [out], attributes={"to": float_type}, name="embed_audio/round")
        nodes.append(down)
        out = down.outputs[0]
    out.name, out.dtype, out.shape = "hidden_in", float_type, ir.Shape([batch, "N", hidden])
    contract = _contract({"audio_ids": {"shape": [batch, "N", num_vq], "dtype": "int64"}},
                         {"hidden_in": {"shape": [batch, "N", hidden], "dtype": dtype}})
    weight_bytes = sum(v.const_value.nbytes for v in inits if v.name.endswith(".weight"))
    return Graph("embed_audio", _model("embed_audio", [ids], [out], nodes, inits), contract, weight_bytes)


def audio_head_graph(weights: list[torch.Tensor], dtype: str, batch: int | str, last_only: bool = False) -> Graph:
    """``hidden_out`` [B, N, hidden] -> ``audio_logits`` [B, N|1, num_audio_tokens, num_vq], entry
    [..., a, i] = hidden_out . weights[i][a] (``weights``: each codebook's folded head
    [num_audio_tokens, hidden]); ``last_only``: only the last position's."""
    num_vq = len(weights)
    audio, hidden = weights[0].shape
    float_type = ONNX_DTYPES[dtype]
    x = _value("hidden_out", float_type, [batch, "N", hidden])
    nodes: list = []
    inits: list = []
    h = x
    if last_only:
        starts, ends, axes = (_const(f"head_audio/last_{n}", np.array([v], dtype=np.int64))
                              for n, v in (("starts", -1), ("ends", INT64_MAX), ("axes", 1)))
        last = ir.node("Slice", [x, starts, ends, axes], name="head_audio/last")
        nodes.append(last)
        inits += [starts, ends, axes]
        h = last.outputs[0]
    # Column a * num_vq + i is weights[i][a], so the MatMul's [.., audio * num_vq] reshapes to
    # [.., audio, num_vq] with the codebook last, as the TTS stacks its logits.
    w_t = torch.stack([w.to(torch.float32) for w in weights], dim=-1).permute(1, 0, 2).reshape(hidden, audio * num_vq)
    w_t = _const("head_code.weight_t", _np(w_t.contiguous(), dtype))
    shape = _const("head_audio/shape", np.array([0, 0, audio, num_vq], dtype=np.int64))
    mm = ir.node("MatMul", [h, w_t], name="head_audio/matmul")
    reshape = ir.node("Reshape", [mm.outputs[0], shape], name="head_audio/codebooks")
    nodes += [mm, reshape]
    inits += [w_t, shape]
    rows = 1 if last_only else "N"
    out = reshape.outputs[0]
    out.name, out.dtype, out.shape = "audio_logits", float_type, ir.Shape([batch, rows, audio, num_vq])
    contract = _contract({"hidden_out": {"shape": [batch, "N", hidden], "dtype": dtype}},
                         {"audio_logits": {"shape": [batch, rows, audio, num_vq], "dtype": dtype}})
    return Graph("head_audio", _model("head_audio", [x], [out], nodes, inits), contract, w_t.const_value.nbytes)


__all__ = ["audio_embed_graph", "audio_head_graph"]
