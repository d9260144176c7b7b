"""A local MiniCPM-o-2_6 checkpoint: only its TTS decoder (``tts.model.*``) is read.

The TTS decoder is a LlamaModel built from config.json's ``tts_config`` with
LlamaConfig's defaults for every field tts_config does not set. No remote code
runs and no tensor of the 8B language model is loaded: the safetensors index
says which shard holds each ``tts.model.*`` tensor, and only those are opened.
"""
from __future__ import annotations

from pathlib import Path

from kvplan.models.base import ModelError, ModelSource
from kvplan.models.hf_dir import make_source, read_config

# The TTS module's text-token embedding (ConditionalChatTTS.emb_text), outside its LlamaModel.
TEXT_EMBEDDING = "tts.emb_text.weight"
# LlamaConfig's defaults, which the TTS module inherits for fields tts_config omits.
LLAMA_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "vocab_size": 32000,
                  "hidden_act": "silu", "attention_bias": False, "mlp_bias": False}


def _config(arg: str) -> dict | None:
    path = Path(arg) / "config.json"
    if not path.is_file():
        return None
    cfg = read_config(path)
    if not isinstance(cfg, dict):
        return None     # not MiniCPM-o; the Hugging Face source names the problem
    return cfg if "tts_config" in cfg or cfg.get("model_type") == "minicpmo" else None


def accepts(arg: str) -> bool:
    return _config(arg) is not None


def load(arg: str) -> ModelSource:
    directory = Path(arg)
    cfg = _config(arg)
    config_file = directory / "config.json"
    tts = cfg.get("tts_config")
    if not isinstance(tts, dict):
        raise ModelError(f"{config_file}: MiniCPM-o config without a 'tts_config' object")
    own = {k: v for k, v in tts.items() if k != "model_type"}
    llama = {**LLAMA_DEFAULTS, **own}
    # The reference: transformers' LlamaConfig from tts_config itself, with its own defaults.
    return make_source(directory, llama, config_file, prefix="tts.model.", kind="minicpmo", family="llama",
                       reference_config={"model_type": "llama", **own},
                       # The directory's tokenizer is the 8B language model's, not the TTS decoder's.
                       tokenizer=False,
                       # What the TTS looks its text tokens up in before the decoder (the LlamaModel's own
                       # embed_tokens is never used by it).
                       embedding=TEXT_EMBEDDING, field_prefix="tts_config.")


