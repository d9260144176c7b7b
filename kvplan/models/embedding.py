"""Token ids -> the hidden states a decoder's runtime feeds as ``hidden_in``: the source's own
embedding rows, times the family's embedding scale (Gemma 2: √hidden_size)."""
from __future__ import annotations

from kvplan.errors import ModelError
from kvplan.lazy import lazy_import
from kvplan.models import families

torch = lazy_import("torch")


def embedding_matrix(source) -> torch.Tensor:
    """The source's input embedding [vocab, hidden] as the source holds it (``read_embedding``:
    for MiniCPM-o's TTS its text embedding, elsewhere ``embed_tokens.weight``)."""
    if source.read_embedding is None:
        raise ModelError(f"{source.path or source.name}: has no embedding matrix to turn token ids into "
                         f"hidden states")
    return source.read_embedding()


def embed(source, ids: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
    """``ids`` [..., tokens] -> float32 [..., tokens, hidden]. ``matrix``: the embedding, when the
    caller already holds it."""
    matrix = embedding_matrix(source) if matrix is None else matrix
    ids = torch.as_tensor(ids, dtype=torch.long)
    if ids.numel() and (int(ids.max()) >= matrix.shape[0] or int(ids.min()) < 0):
        raise ModelError(f"{source.path or source.name}: token ids outside the embedding's {matrix.shape[0]} rows")
    scale = families.get(source.config.family).embedding_scale(source.config)
    return matrix[ids].to(torch.float32) * scale
