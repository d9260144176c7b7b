"""A checkpoint's own tokenizer, for the stages that turn text into token ids (calibration,
validation inputs, perplexity, generation).

The tokenizer is transformers' own reading of what the checkpoint ships (``tokenizer.json``,
a SentencePiece model, or a GGUF file's metadata), loaded from disk only: no hub. kvplan
wraps it in the few calls it needs, so the stages never depend on transformers' tokenizer
classes directly.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kvplan.errors import ModelError

# Files that make a directory's tokenizer loadable by transformers without a download.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class Tokenizer:
    """``encode(text)`` -> token ids (with the checkpoint's own special tokens, e.g. its BOS);
    ``decode(ids)`` -> text. ``eos_ids``: the ids that end a generation."""
    backend: object
    source: str

    def encode(self, text: str, special: bool = True) -> list[int]:
        return list(self.backend(text, add_special_tokens=special)["input_ids"])

    def decode(self, ids) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=True)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        eos = self.backend.eos_token_id
        return () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.backend, "chat_template", None)

    def chat(self, text: str) -> list[int]:
        """``text`` as one user turn of the checkpoint's chat template, ready for the reply."""
        if not self.chat_template:
            raise ModelError(f"{self.source}: the tokenizer has no chat template")
        ids = self.backend.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True)
        return list(ids["input_ids"])


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: Path, gguf_file: str | None = None) -> Tokenizer:
    """The tokenizer saved in ``directory`` (or in its GGUF file ``gguf_file``)."""
    import transformers  # heavy; only a stage that needs text pays for it

    where = str(directory / gguf_file) if gguf_file else str(directory)
    try:
        backend = transformers.AutoTokenizer.from_pretrained(str(directory), gguf_file=gguf_file,
                                                             local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelError(f"{where}: its tokenizer cannot be loaded ({type(e).__name__}: {e})") from None
    return Tokenizer(backend, where)
