"""MiniCPM-o 2.6's TTS audio ends as its checkpoint stores them (ConditionalChatTTS): per-codebook
audio embeddings ``tts.emb_code.{i}`` and weight-normalized heads ``tts.head_code.{i}``; their names,
sizes and the weight-norm fold. The graphs built from them are kvplan.embed_head.tts's."""
from __future__ import annotations

from kvplan.errors import ModelError
from kvplan.lazy import lazy_import

torch = lazy_import("torch")

# ConditionalChatTTSConfig.__init__'s defaults (configuration_minicpm.py of openbmb/MiniCPM-o-2_6, the
# checkpoint's remote code), which apply to every field config.json's tts_config omits.
TTS_DEFAULTS = {"hidden_size": 768, "num_audio_tokens": 626, "num_text_tokens": 21178, "num_vq": 4}

EMB_CODE = "tts.emb_code.{i}.weight"
# A head's weight-norm tensors (g, v), in the two spellings torch writes: parametrizations.weight_norm
# (original0 = g, original1 = v) and the old nn.utils.weight_norm (weight_g, weight_v).
HEAD_SPELLINGS = (("tts.head_code.{i}.parametrizations.weight.original0",
                   "tts.head_code.{i}.parametrizations.weight.original1"),
                  ("tts.head_code.{i}.weight_g", "tts.head_code.{i}.weight_v"))


def tts_sizes(tts_config: dict, where: str = "config.json") -> dict[str, int]:
    """num_vq, num_audio_tokens, num_text_tokens and hidden_size of ``tts_config`` (TTS_DEFAULTS for
    those it omits); ``where`` names the file in errors."""
    sizes = {}
    for key, default in TTS_DEFAULTS.items():
        value = tts_config.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelError(f"{where}'s tts_config.{key} must be a positive integer, got {value!r}")
        sizes[key] = value
    return sizes


def head_names(i: int, available: set[str], where: str = "the checkpoint") -> tuple[str, str]:
    """Codebook ``i``'s head (g, v) names in the spelling ``available`` holds."""
    for g, v in HEAD_SPELLINGS:
        g, v = g.format(i=i), v.format(i=i)
        if g in available and v in available:
            return g, v
        if g in available or v in available:
            missing = v if g in available else g
            raise ModelError(f"{where}: tensor {missing!r} is missing (its weight-norm partner "
                             f"{(g if g in available else v)!r} is there)")
    g0, g1 = (spelling[0].format(i=i) for spelling in HEAD_SPELLINGS)
    raise ModelError(f"{where}: tensor {g0!r} is missing (nor is there the old weight_norm's {g1!r}): "
                     f"the TTS's audio head {i} (tts.head_code.{i}) is not in the checkpoint")


def tts_tensor_names(tts_config: dict, available: set[str], where: str = "the checkpoint") -> list[str]:
    """The checkpoint names of the TTS's audio ends: emb_code.{i} for every codebook, then each
    head's g and v in whichever weight-norm spelling ``available`` holds. A ModelError (``where``
    naming the checkpoint) names the first missing tensor."""
    num_vq = tts_sizes(tts_config)["num_vq"]
    names = []
    for i in range(num_vq):
        name = EMB_CODE.format(i=i)
        if name not in available:
            raise ModelError(f"{where}: tensor {name!r} is missing: the TTS's audio embedding {i} of "
                             f"tts_config.num_vq = {num_vq}")
        names.append(name)
    for i in range(num_vq):
        names += head_names(i, available, where)
    return names


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W = v * (g / ||v||) in float32, the norm over every dim of ``v`` but dim 0 (each output row);
    ``g`` holds one gain per row ([rows, 1, ...] as torch stores it, or [rows])."""
    v32 = v.to(torch.float32)
    if g.numel() != v.shape[0]:
        raise ModelError(f"weight norm: g has {g.numel()} values for v's {v.shape[0]} rows")
    g32 = g.to(torch.float32).reshape(v.shape[0], *([1] * (v.dim() - 1)))
    norm = torch.linalg.vector_norm(v32, dim=tuple(range(1, v.dim())), keepdim=True)
    return v32 * (g32 / norm)
