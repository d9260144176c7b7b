"""What validation feeds the decoder: the model's own embeddings of real tokens.

A runtime feeds ``hidden_in`` the embedding rows of its tokens (Gemma 2: times √hidden_size), so
validation does too: the prefill whose cache the points read, every point's new tokens and the
task check's prompt are tokens of one sequence per batch row, embedded by transformers' own input
embedding of the family (reference.reference_embedding). Hidden states drawn at random sit far
off that distribution (SmolLM2-135M's embedding rows have norm ≈ 3.2, a standard-normal row of
576 values ≈ 24), where fp16 rounding grows past tolerances a real input never comes near.

The tokens are a text read with the checkpoint's own tokenizer where it ships one (the text that
ships with kvplan, or ``--text FILE``), repeated when a profile asks for more tokens than it has;
else seeded token ids over the embedding's rows. A point of N tokens after lastSum reads its
row's tokens lastSum..lastSum+N-1, the continuation of the prefix whose cache it is given. Batch
rows start at different places of the text, so no two rows are alike. A source without an
embedding matrix is fed seeded standard-normal hidden states, and its record says so.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from kvplan.errors import UserError
from kvplan.lazy import lazy_import
from kvplan.validate.reference import reference_embedding

torch = lazy_import("torch")

SHIPPED_TEXT = "validation_text.txt"


@dataclass(frozen=True)
class Text:
    name: str
    content: str
    sha256: str


def _text(name: str, data: bytes, where: str) -> Text:
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{where}: not UTF-8 text (byte {e.start})") from None
    if not content.strip():
        raise UserError(f"{where}: the text is empty")
    return Text(name, content, hashlib.sha256(data).hexdigest())


def shipped_text() -> Text:
    """The text kvplan ships for validation (kvplan/validate/validation_text.txt, the project's own)."""
    return _text(SHIPPED_TEXT, resources.files(__package__).joinpath(SHIPPED_TEXT).read_bytes(), SHIPPED_TEXT)


def read_text(path: Path) -> Text:
    """A user's text (``--text FILE``)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"--text {path}: cannot be read ({e.strerror or e})") from None
    return _text(Path(path).name, data, f"--text {path}")


@dataclass
class Inputs:
    """``hidden`` [rows, length, hidden] in the profile dtype: what position p of batch row b is fed;
    ``ids`` [rows, length], the tokens they embed (None without an embedding matrix); ``record``:
    what they are, for the manifest."""
    hidden: torch.Tensor
    ids: torch.Tensor | None
    record: dict
    seed: int = 0

    def prompt(self, n: int, vocab: int) -> list[int]:
        """The task check's prompt: row 0's first ``n`` tokens (seeded ids without any)."""
        if self.ids is not None and self.ids.shape[1] >= n:
            return self.ids[0, :n].tolist()
        return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(self.seed)).tolist()

    def describe(self) -> str:
        r = self.record
        if r["kind"] == "text":
            return (f"embeddings ({r['embedding']}) of {r['text']} (sha256 {r['sha256'][:12]}, {r['text_tokens']} "
                    f"tokens{', repeated' if r['repeated'] else ''}) read with the model's tokenizer")
        if r["kind"] == "seeded token ids":
            return f"embeddings ({r['embedding']}) of seeded token ids (seed {r['seed']}; the model ships no tokenizer)"
        return f"seeded standard-normal hidden states (seed {r['seed']}): {r['why']}"


def _text_rows(tokenizer, text: Text, rows: int, length: int) -> tuple[torch.Tensor, dict]:
    first = tokenizer.encode(text.content)                 # with the tokenizer's own special tokens (BOS)
    body = tokenizer.encode(text.content, special=False)   # each repetition after the first
    if not body:
        raise UserError(f"{text.name}: the tokenizer reads no tokens in the text")
    starts = [b * len(body) // rows for b in range(rows)]
    stream = list(first)
    while len(stream) < starts[-1] + length:
        stream += body
    ids = torch.tensor([stream[s:s + length] for s in starts], dtype=torch.int64)
    record = {"kind": "text", "text": text.name, "sha256": text.sha256, "tokenizer": tokenizer.source,
              "text_tokens": len(first), "repeated": starts[-1] + length > len(first), "row_starts": starts}
    return ids, record


def validation_inputs(source, rows: int, length: int, dtype: torch.dtype, text: Text | None = None,
                      seed: int = 0) -> Inputs:
    """The embeddings every point, the prefill and the task check read: ``rows`` batch rows of
    ``length`` positions. ``text``: the user's (None: the shipped one, where the model has a tokenizer)."""
    tokenizer = source.tokenizer() if source.tokenizer is not None else None
    if text is not None and tokenizer is None:
        raise UserError(f"--text {text.name}: {source.name} ships no tokenizer to read it with")
    if source.read_embedding is None:
        if text is not None:
            raise UserError(f"--text {text.name}: {source.name} has no input embedding matrix to embed it with")
        g = torch.Generator().manual_seed(seed)
        hidden = torch.randn(rows, length, source.config.hidden_size, generator=g).to(dtype)
        why = f"{source.name} has no input embedding matrix"
        return Inputs(hidden, None, {"kind": "random hidden states", "distribution": "standard normal",
                                     "seed": seed, "why": why, "rows": rows, "length": length}, seed)
    embed = reference_embedding(source)
    if tokenizer is not None:
        ids, record = _text_rows(tokenizer, text or shipped_text(), rows, length)
    else:
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, embed.num_embeddings, (rows, length), generator=g)
        record = {"kind": "seeded token ids", "seed": seed, "vocab": embed.num_embeddings}
    if int(ids.max()) >= embed.num_embeddings:
        raise UserError(f"{source.name}: the tokenizer gives token id {int(ids.max())}, beyond the "
                        f"{embed.num_embeddings} rows of {source.embedding}")
    with torch.no_grad():
        hidden = embed(ids).to(dtype)
    return Inputs(hidden, ids, {**record, "embedding": source.embedding, "rows": rows, "length": length}, seed)
