"""AWQ's calibration inputs: hidden states entering the first decoder layer, [samples, tokens, hidden].

- "synthetic" (presets, and any model without data): seeded standard-normal hidden states, the
  scale of a residual stream right after the embedding. AWQ's benefit shows where the linears'
  inputs have a few large channels; the normalised inputs get those from the model's own norm
  gains (the ``tiny-llama-outliers`` preset has them), so synthetic hidden states suffice there.
- a safetensors file holding ``hidden_states`` [samples, tokens, hidden] (float), or
  ``input_ids`` [samples, tokens] (integer) embedded with the checkpoint's own embedding matrix
  (``model.embed_tokens.weight``; MiniCPM-o-2_6's TTS: ``tts.emb_text.weight``), read from the
  shards by name like every other tensor.
The first ``samples`` x ``tokens`` of the file are used.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from kvplan.errors import QuantizeError
from kvplan.models.safetensors_dir import TensorIndex
from kvplan.quantize.settings import Quantize

HIDDEN, IDS = "hidden_states", "input_ids"
MINICPMO_EMBEDDING = "tts.emb_text.weight"


def calibration_hidden(source, settings: Quantize) -> torch.Tensor:
    """[samples, tokens, hidden] float32."""
    cfg = source.config
    if settings.calibration == "synthetic":
        g = torch.Generator().manual_seed(settings.seed)
        return torch.randn(settings.samples, settings.tokens, cfg.hidden_size, generator=g)
    path = Path(settings.calibration)
    if not path.is_file():
        raise QuantizeError(f"quantize.calibration: {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            if HIDDEN in keys:
                data = f.get_tensor(HIDDEN)
                name = HIDDEN
            elif IDS in keys:
                data = f.get_tensor(IDS)
                name = IDS
            else:
                raise QuantizeError(f"{path}: no tensor {HIDDEN!r} [samples, tokens, hidden] or {IDS!r} "
                                    f"[samples, tokens] (found: {', '.join(sorted(keys)) or 'none'})")
    except (OSError, RuntimeError) as e:        # safetensors' own error for a file that is not one
        if isinstance(e, QuantizeError):
            raise
        raise QuantizeError(f"{path}: not a safetensors file ({e})") from None
    if name == HIDDEN:
        if data.dim() != 3 or data.shape[2] != cfg.hidden_size or not data.is_floating_point():
            raise QuantizeError(f"{path}: tensor {HIDDEN!r} is {data.dtype} {list(data.shape)}; expected float "
                                f"[samples, tokens, {cfg.hidden_size}] (the model's hidden size)")
        hidden = data
    else:
        if data.dim() != 2 or data.is_floating_point():
            raise QuantizeError(f"{path}: tensor {IDS!r} is {data.dtype} {list(data.shape)}; expected integer "
                                f"[samples, tokens]")
        hidden = None
    data = data[:settings.samples, :settings.tokens]
    if hidden is None:
        embedding = _embedding(source, path)
        if int(data.max()) >= embedding.shape[0] or int(data.min()) < 0:
            raise QuantizeError(f"{path}: tensor {IDS!r} holds ids outside the embedding's "
                                f"{embedding.shape[0]} rows")
        hidden = embedding[data.long()]
    return hidden.to(torch.float32).contiguous()


def _embedding(source, path: Path) -> torch.Tensor:
    if source.kind == "minicpmo":
        (emb,) = TensorIndex(source.path).read([MINICPMO_EMBEDDING]).values()
    elif source.read_lm is not None:
        emb = source.read_lm()["embed_tokens.weight"]
    else:
        raise QuantizeError(f"{path}: token ids need the model's embedding matrix; {source.name} has none "
                            f"(give {HIDDEN!r} instead)")
    return emb.to(torch.float32)
