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
from kvplan.models.safetensors_dir import TensorIndex
from kvplan.models.tts_tensors import EMB_CODE, fold_weight_norm, tts_sizes, tts_tensor_names

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
    source = make_source(directory, llama, config_file, prefix="tts.model.", kind="minicpmo", family="llama",
                         reference_config={"model_type": "llama", **own},
                         # The directory's tokenizer is the 8B language model's, not the TTS decoder's.
                         tokenizer=False,
                         # What the TTS looks its text tokens up in before the decoder (the LlamaModel's own
                         # embed_tokens is never used by it).
                         embedding=TEXT_EMBEDDING, field_prefix="tts_config.")
    # Only a checkpoint holding the audio ends offers them (a decoder-only test layout has none).
    if EMB_CODE.format(i=0) in TensorIndex(directory).where:
        source.read_tts = tts_reader(directory, tts, config_file)
    return source


def tts_reader(directory: Path, tts: dict, config_file: Path):
    """``read_tts()`` of ModelSource: the TTS's per-codebook audio embeddings (``tts.emb_code.{i}``)
    and weight-norm-folded heads (``tts.head_code.{i}``, either spelling), and tts_config's sizes.
    Nothing is opened until it is called (the decoder's export never needs them); then only those
    tensors are read, after their headers are checked against tts_config."""
    def read_tts() -> dict:
        sizes = tts_sizes(tts, str(config_file))
        index = TensorIndex(directory)
        listing = directory / "model.safetensors.index.json"
        names = tts_tensor_names(tts, set(index.where), str(listing if listing.is_file() else directory))
        num_vq, audio, hidden = sizes["num_vq"], sizes["num_audio_tokens"], sizes["hidden_size"]
        for n, name in enumerate(names):
            # names: emb_code 0..num_vq-1, then each head's g ([audio, 1] as torch stores it) and v.
            gain = n >= num_vq and (n - num_vq) % 2 == 0
            want = [(audio, 1), (audio,)] if gain else [(audio, hidden)]
            header = index.header(name)
            if header[0] not in want:
                raise ModelError(f"{index.where[name]}: tensor {name!r} is {list(header[0])}, but {config_file}'s "
                                 f"tts_config.num_audio_tokens = {audio} and hidden_size = {hidden} need "
                                 f"{list(want[0])}")
        got = index.read(names)
        heads = names[num_vq:]
        return {"emb_code": [got[name] for name in names[:num_vq]],
                "head_code": [fold_weight_norm(got[g], got[v]) for g, v in zip(heads[::2], heads[1::2])],
                "tts_config": sizes}
    return read_tts


