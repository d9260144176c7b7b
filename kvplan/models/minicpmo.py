"""A local MiniCPM-o-2_6 checkpoint: only its TTS decoder (``tts.model.*``) is read.

The TTS decoder is the LlamaModel ConditionalChatTTS builds (the checkpoint's modeling_minicpmo.py):
``LlamaConfig(hidden_size, intermediate_size, num_attention_heads, num_hidden_layers,
max_position_embeddings)`` from its config, nothing else, so every other field is LlamaConfig's
default (num_key_value_heads = num_attention_heads among them) whatever tts_config says, and each
of the five that tts_config omits is ConditionalChatTTSConfig's default. No remote code
runs and no tensor of the 8B language model is loaded: the safetensors index
says which shard holds each ``tts.model.*`` tensor, and only those are opened.
"""
from __future__ import annotations

from pathlib import Path

from kvplan.models.base import HF_FIELDS, ModelError, ModelSource
from kvplan.models.hf_dir import make_source, read_config
from kvplan.models.safetensors_dir import TensorIndex
from kvplan.models.tts_tensors import EMB_CODE, fold_weight_norm, tts_sizes, tts_tensor_names

# The TTS module's text-token embedding (ConditionalChatTTS.emb_text), outside its LlamaModel.
TEXT_EMBEDDING = "tts.emb_text.weight"
# The fields ConditionalChatTTS passes to LlamaConfig, with ConditionalChatTTSConfig's defaults.
DECODER_FIELDS = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 20,
                  "max_position_embeddings": 4096}
# tts_config fields of the TTS module's own (not its decoder's), never worth a note.
TTS_OWN = {"model_type", "llm_dim", "num_audio_tokens", "num_text_tokens", "num_vq", "num_mel_bins", "streaming",
           "use_speaker_embedding", "use_llm_hidden_state", "num_spk_embs", "spk_emb_token_id", "use_text",
           "streaming_text_chunk_size", "streaming_audio_chunk_size", "streaming_text_reserved_len",
           "audio_bos_token_id", "top_p", "top_k", "repetition_penalty", "use_mlp", "aug_loss_weight",
           "attn_implementation"}
# LlamaConfig's defaults, which the TTS decoder has for every other field.
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
    own = {k: tts.get(k, default) for k, default in DECODER_FIELDS.items()}
    llama = {**LLAMA_DEFAULTS, **own}
    ignored = sorted(set(tts) - set(DECODER_FIELDS) - TTS_OWN)
    # The reference: transformers' LlamaConfig from those five fields, as the TTS builds it.
    source = make_source(directory, llama, config_file, prefix="tts.model.", kind="minicpmo", family="llama",
                         reference_config={"model_type": "llama", **own},
                         # The directory's tokenizer is the 8B language model's, not the TTS decoder's.
                         tokenizer=False,
                         # What the TTS looks its text tokens up in before the decoder (the LlamaModel's own
                         # embed_tokens is never used by it).
                         embedding=TEXT_EMBEDDING, field_prefix="tts_config.",
                         # Its key/value heads are its attention heads (LlamaConfig's default).
                         field_names={**HF_FIELDS, "num_kv_heads": "num_attention_heads"})
    if ignored:
        source.notes += (f"{config_file}: tts_config's {', '.join(ignored)} not read: MiniCPM-o's TTS builds its "
                         f"decoder from {', '.join(DECODER_FIELDS)} alone (LlamaConfig's defaults for the rest)",)
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


