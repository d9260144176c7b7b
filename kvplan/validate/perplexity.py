"""Perplexity through what was built: ``kvplan eval``.

The target's ONNX graphs run in ONNX Runtime as a deployment runtime drives them: a text's
tokens (the checkpoint's own tokenizer, its BOS included) are fed in chunks as large as the
engine's biggest optimization profile takes, each chunk on top of the cache the chunks before
it left (fed back as the target's ``kv_io`` mode requires). ``hidden_in`` is the checkpoint's
embedding rows (times the family's scale) in the profile dtype; the logits are the LM head
applied in float32 to the graph's ``hidden_out`` (soft-capped where the family caps them).
Every token after the first is scored: perplexity = exp(mean negative log-likelihood).

Beside it, transformers' own model of the checkpoint in float32 (full precision, whatever the
target's: the int4 target is compared with the model it quantized) scores the same tokens in
the same chunks with its own cache; from both, the top-1 agreement and the mean KL divergence
KL(reference || graph) per token.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np

from kvplan.errors import KvplanError, UserError
from kvplan.export.exporter import TORCH_DTYPES, causal_mask
from kvplan.lazy import lazy_import
from kvplan.models.embedding import embed
from kvplan.runtime.ort_session import session as open_session
from kvplan.runtime.steps import chunk_size
from kvplan.validate.onnx_stack import OnnxStack, Pack
from kvplan.validate.reference import HFReference

torch = lazy_import("torch")


def text_ids(source, path: Path, tokens: int) -> list[int]:
    if source.tokenizer is None:
        raise UserError(f"--text {path}: {source.path or source.name} ships no tokenizer to read it with")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"--text {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise UserError(f"--text {path}: not UTF-8 text ({e})") from None
    ids = source.tokenizer().encode(text)
    if len(ids) < 2:
        raise UserError(f"--text {path}: {len(ids)} token(s); perplexity needs at least 2")
    return ids[:tokens]


def _softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(logits / cap) if cap else logits


def _chunks(n_tokens: int, size: int):
    start = 0
    while start < n_tokens:
        yield start, min(start + size, n_tokens)
        start += size


class GraphEnds:
    """The target's embed.onnx and head.onnx (a head returning every position's logits), in ONNX Runtime."""

    def __init__(self, embed: Path, head: Path):
        self.embed_session, self.head_session = open_session(embed), open_session(head)
        self.names = f"{embed.name}, {head.name}"

    def embed(self, ids: list[int]) -> np.ndarray:
        return self.embed_session.run(None, {"input_ids": np.array([ids], dtype=np.int64)})[0]

    def logits(self, hidden: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(self.head_session.run(["logits"], {"hidden_out": hidden})[0][0].astype(np.float32))


def full_logit_head(record: dict | None) -> tuple[Path, Path] | None:
    """(embed.onnx, head.onnx) relative paths where the embed_head stage wrote a head that returns
    every position's whole vocabulary row (what scoring a text needs), else None."""
    ends = {a["graph"]: a for a in (record or {}).get("artifacts", []) if "graph" in a}
    if "embed" not in ends or "head" not in ends:
        return None
    out = ends["head"]["io"]["outputs"].get("logits")
    return (Path(ends["embed"]["path"]), Path(ends["head"]["path"])) if out and out["shape"][1] == "N" else None


def graph_logprobs(source, profile, packs: list[Pack], ids: list[int], chunk: int, head: torch.Tensor | None,
                   matrix: torch.Tensor | None, log: Callable[[str], None], ends: GraphEnds | None = None):
    """Log-probabilities [tokens, vocab] (float32) of the graph's next-token prediction at each position:
    through ``ends`` (the target's embedding and head graphs) where given, else the checkpoint's
    embedding ``matrix`` and LM ``head`` in float32."""
    cfg, dtype = source.config, TORCH_DTYPES[profile.dtype]
    if dtype == torch.bfloat16:
        raise UserError(f"{profile.source}: eval runs ONNX Runtime, whose CPU provider has no bfloat16 kernels")
    stack = OnnxStack(packs)
    past = [np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), dtype=np.dtype(str(dtype).removeprefix("torch.")))
            for _ in range(2 * cfg.num_layers)]
    out = []
    for start, end in _chunks(len(ids), chunk):
        t0 = time.perf_counter()
        x = ends.embed(ids[start:end]) if ends else embed(source, torch.tensor([ids[start:end]]), matrix).to(dtype).numpy()
        mask = causal_mask(1, end - start, start, dtype, window=cfg.sliding_window).numpy()
        pos = np.arange(start, end, dtype=np.int64)[None]
        hidden, past = stack.step(x, mask, pos, past)
        logits = ends.logits(hidden) if ends else _softcap(
            torch.from_numpy(np.asarray(hidden, dtype=np.float32))[0] @ head.t(), cfg.logit_softcap)
        out.append(torch.log_softmax(logits, dim=-1))
        log(f"[eval] graph: tokens {start}..{end - 1} ({time.perf_counter() - t0:.1f} s)")
    stack.release()
    return torch.cat(out)


def reference_scores(source, ids: list[int], chunk: int, got: torch.Tensor, log: Callable[[str], None]) -> dict:
    """transformers' float32 model of the checkpoint, chunk by chunk on its own cache, scored against
    the graph's log-probabilities ``got`` chunk by chunk (one chunk of the reference's at a time)."""
    ref = HFReference(source, torch.float32, with_lm=True)
    cache = ref.new_cache()
    nll = agree = kl = 0.0
    with torch.no_grad():
        for start, end in _chunks(len(ids), chunk):
            result = ref.model(input_ids=torch.tensor([ids[start:end]]), use_cache=True,
                               position_ids=torch.arange(start, end)[None], **{ref._cache_kw: cache})
            want = torch.log_softmax(result.logits[0].float(), dim=-1)
            scored = min(end, len(ids) - 1) - start          # the last token predicts nothing
            want, mine = want[:scored], got[start:start + scored]
            nll -= float(want.gather(1, torch.tensor(ids[start + 1:start + 1 + scored])[:, None]).sum())
            agree += float((mine.argmax(-1) == want.argmax(-1)).sum())
            kl += float((want.exp() * (want - mine)).sum())
    log(f"[eval] reference: transformers float32 on {len(ids)} tokens")
    n = len(ids) - 1
    return {"ran": True, "model": "transformers float32", "perplexity": math.exp(nll / n),
            "top1_agreement": agree / n, "mean_kl": kl / n}


def evaluate(source, profile, packs: list[Pack], text: Path, tokens: int, reference: bool,
             log: Callable[[str], None] = print, ends: tuple[Path, Path] | None = None) -> dict:
    """Score ``tokens`` tokens of ``text`` through ``packs`` (and the embedding and head graphs
    ``ends`` where given); the figures, and the reference's."""
    if tokens < 2:
        raise UserError(f"--tokens {tokens}: perplexity needs at least 2")
    ids = text_ids(source, text, tokens)
    positions = min(profile.max_sum, source.config.max_position_embeddings)
    if len(ids) > positions:
        raise UserError(f"--tokens {len(ids)}: the target's optimization profiles take at most {positions} "
                        f"positions (N max + lastSum max); ask for fewer")
    chunk = chunk_size(profile)
    if source.read_lm is None:
        raise UserError(f"{source.path or source.name}: has no embedding matrix and LM head to score text with")
    graphs = GraphEnds(*ends) if ends else None
    head = matrix = None
    if graphs is None:
        lm = source.read_lm()
        head, matrix = lm["lm_head.weight"].to(torch.float32), lm["embed_tokens.weight"]
        del lm
    through = graphs.names if graphs else "the checkpoint's embedding and LM head in float32"
    log(f"[eval] {len(ids)} tokens of {text} in chunks of {chunk} through {', '.join(p.path.name for p in packs)} "
        f"and {through} (ONNX Runtime, int4 at accuracy level 0)")
    got = graph_logprobs(source, profile, packs, ids, chunk, head, matrix, log, graphs)[:-1]
    del head, matrix, graphs
    target = torch.tensor(ids[1:])
    result = {"text": str(text), "tokens": len(ids), "scored": len(ids) - 1, "chunk": chunk,
              "graphs": [p.path.name for p in packs], "ends": through,
              "perplexity": math.exp(float(-got.gather(1, target[:, None]).mean()))}
    if reference:
        try:
            result["reference"] = reference_scores(source, ids, chunk, got, log)
        except (ValueError, KvplanError) as e:          # a source transformers cannot build
            result["reference"] = {"ran": False, "why": str(e)}
    return result


def summary(result: dict) -> list[str]:
    lines = []
    ref = result.get("reference")
    if ref and ref.get("ran"):
        lines.append(f"reference ({ref['model']}): perplexity {ref['perplexity']:.3f}")
        lines.append(f"top-1 agreement with the reference {100 * ref['top1_agreement']:.1f} %, mean KL "
                     f"{ref['mean_kl']:.4f} nats/token")
    elif ref:
        lines.append(f"reference not run: {ref['why']}")
    lines.append(f"perplexity: {result['perplexity']:.3f} ({result['scored']} tokens)")
    return lines
