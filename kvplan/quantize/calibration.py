"""AWQ's calibration inputs: hidden states entering the first decoder layer, [samples, tokens, hidden].

``[quantize] calibration`` says where they come from:

- "auto" (the default): "self" for a checkpoint with an LM head, "synthetic" for presets (their
  random weights write no text worth reading) and for checkpoints without one (with a warning).
- "self": text the model writes itself (kvplan.quantize.generated), embedded with its own
  embedding matrix. No data set needed.
- "text:FILE" (or a path ending in ``.txt``): a UTF-8 text, tokenized with the checkpoint's own
  tokenizer; its first ``samples`` x ``tokens`` tokens, in consecutive windows of ``tokens``.
- a safetensors file holding ``hidden_states`` [samples, tokens, hidden] (float), or ``input_ids``
  [samples, tokens] (integer) embedded with the checkpoint's own input embedding (MiniCPM-o-2_6's
  TTS: ``tts.emb_text.weight``, ``ModelSource.read_embedding``).
- "synthetic": seeded standard-normal hidden states. A trained model never sees these (its
  embedding rows are a few times smaller), so AWQ's scales come out worse than from text; a
  checkpoint calibrated on them is warned about.

A source that holds fewer than ``samples`` x ``tokens`` is refused, never cut; so is one holding
NaN or infinite values.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from safetensors import safe_open

from kvplan.errors import KvplanError, QuantizeError
from kvplan.lazy import lazy_import
from kvplan.manifest import sha256_file
from kvplan.models.embedding import embed
from kvplan.models.tokenizer import TOKENIZER_FILES
from kvplan.quantize import generated
from kvplan.quantize.generated import sample_ids
from kvplan.quantize.settings import Quantize

torch = lazy_import("torch")

HIDDEN, IDS = "hidden_states", "input_ids"
AUTO, SELF, SYNTHETIC, TEXT = "auto", "self", "synthetic", "text:"


@dataclass(frozen=True)
class Calibration:
    """What a ``calibration`` setting means for one model source."""
    kind: str                   # synthetic | self | text | file
    path: Path | None = None    # text and file
    why: str = ""               # how "auto" chose, for the log

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.path}" if self.path else self.kind


def resolve(setting: str, source) -> Calibration:
    if setting == AUTO:
        if source.kind == "preset":
            return Calibration(SYNTHETIC, why="auto: a preset's random weights")
        if source.read_lm is None:
            return Calibration(SYNTHETIC, why="auto: the checkpoint has no LM head to write text with")
        return Calibration(SELF, why="auto: text the model writes with its own LM head")
    if setting in (SELF, SYNTHETIC):
        return Calibration(setting)
    if setting.startswith(TEXT):
        return Calibration("text", Path(setting[len(TEXT):]))
    path = Path(setting)
    return Calibration("text" if path.suffix == ".txt" else "file", path)


def warning(calibration: Calibration, source) -> str | None:
    """What a user should hear about the choice (None: nothing)."""
    if calibration.kind == SYNTHETIC and source.kind != "preset":
        return (f"warning: {source.path or source.name} is calibrated on synthetic hidden states, which a trained "
                f"model never sees: AWQ's scales come out worse than from text (set quantize.calibration = "
                f"\"self\" or \"text:FILE\")")
    return None


def digest(calibration: Calibration, source) -> dict:
    """What the calibration's data depends on beyond the model's weights (the stage's inputs)."""
    out = {"calibration": calibration.label}
    if calibration.path is not None:
        if not calibration.path.is_file():
            raise QuantizeError(f"quantize.calibration: {calibration.path}: no such file")
        out["calibration_sha256"] = sha256_file(calibration.path)
    if calibration.kind == SELF:
        out["sampling_top_k"] = generated.TOP_K       # what the text is drawn from
    if calibration.kind == "text" and source.path is not None and source.path.is_dir():
        out["tokenizer_sha256"] = {n: sha256_file(source.path / n) for n in TOKENIZER_FILES
                                   if (source.path / n).is_file()}
    return out


def calibration_hidden(source, settings: Quantize, log: Callable[[str], None] = print) -> torch.Tensor:
    """[samples, tokens, hidden] float32."""
    calibration = resolve(settings.calibration, source)
    samples, tokens = settings.samples, settings.tokens
    if calibration.kind == SYNTHETIC:
        g = torch.Generator().manual_seed(settings.seed)
        return torch.randn(samples, tokens, source.config.hidden_size, generator=g)
    if calibration.kind == SELF:
        if source.read_lm is None:
            raise QuantizeError(f"quantize.calibration = \"self\": {source.path or source.name} has no LM head to "
                                f"write its own text with")
        start, banned = _start_and_special(source)
        ids = sample_ids(source, samples, tokens, settings.seed, start, banned, log)
        return embed(source, ids)
    if calibration.kind == "text":
        return _embedded(source, _text_ids(source, calibration.path, samples, tokens), calibration.path)
    return _from_file(source, calibration.path, samples, tokens)


def _text_ids(source, path: Path, samples: int, tokens: int) -> torch.Tensor:
    if not path.is_file():
        raise QuantizeError(f"quantize.calibration: {path}: no such file")
    if source.tokenizer is None:
        raise QuantizeError(f"quantize.calibration: {path}: text calibration needs the checkpoint's tokenizer, "
                            f"and {source.path or source.name} ships none (no {' or '.join(TOKENIZER_FILES)})")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise QuantizeError(f"{path}: not UTF-8 text ({e})") from None
    ids = source.tokenizer().encode(text, special=False)
    need = samples * tokens
    if len(ids) < need:
        raise QuantizeError(f"{path}: {len(ids)} tokens, fewer than quantize.samples x quantize.tokens = "
                            f"{samples} x {tokens} = {need}")
    return torch.tensor(ids[:need], dtype=torch.long).reshape(samples, tokens)


def _from_file(source, path: Path, samples: int, tokens: int) -> torch.Tensor:
    if not path.is_file():
        raise QuantizeError(f"quantize.calibration: {path}: no such file")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            name = HIDDEN if HIDDEN in keys else IDS if IDS in keys else None
            if name is None:
                raise QuantizeError(f"{path}: no tensor {HIDDEN!r} [samples, tokens, hidden] or {IDS!r} "
                                    f"[samples, tokens] (found: {', '.join(sorted(keys)) or 'none'})")
            data = f.get_tensor(name)
    except (OSError, RuntimeError) as e:        # safetensors' own error for a file that is not one
        if isinstance(e, QuantizeError):
            raise
        raise QuantizeError(f"{path}: not a safetensors file ({e})") from None
    hidden_size = source.config.hidden_size
    if name == HIDDEN and (data.dim() != 3 or data.shape[2] != hidden_size or not data.is_floating_point()):
        raise QuantizeError(f"{path}: tensor {HIDDEN!r} is {data.dtype} {list(data.shape)}; expected float "
                            f"[samples, tokens, {hidden_size}] (the model's hidden size)")
    if name == IDS and (data.dim() != 2 or data.is_floating_point()):
        raise QuantizeError(f"{path}: tensor {IDS!r} is {data.dtype} {list(data.shape)}; expected integer "
                            f"[samples, tokens]")
    if data.shape[0] < samples or data.shape[1] < tokens:
        raise QuantizeError(f"{path}: tensor {name!r} is {list(data.shape)}, smaller than quantize.samples x "
                            f"quantize.tokens = {samples} x {tokens}")
    data = data[:samples, :tokens]
    if name == IDS:
        return _embedded(source, data, path)
    bad = int((~torch.isfinite(data)).sum())
    if bad:
        raise QuantizeError(f"{path}: tensor {HIDDEN!r} holds {bad} NaN or infinite value(s)")
    return data.to(torch.float32).contiguous()


def _embedded(source, ids: torch.Tensor, path: Path) -> torch.Tensor:
    if source.read_embedding is None:
        raise QuantizeError(f"{path}: token ids need the model's embedding matrix; {source.name} has none "
                            f"(give {HIDDEN!r} instead)")
    try:
        return embed(source, ids).contiguous()
    except KvplanError as e:
        raise QuantizeError(f"{path}: tensor {IDS!r}: {e}") from None


def _start_and_special(source) -> tuple[int, tuple[int, ...]]:
    """The id a sequence starts with (BOS) and the special ids never sampled, from the tokenizer
    where the checkpoint has one, else from config.json's bos/eos ids."""
    if source.tokenizer is not None:
        backend = source.tokenizer().backend
        special = tuple(sorted(set(backend.all_special_ids)))
        start = backend.bos_token_id if backend.bos_token_id is not None else \
            (special[0] if special else 0)
        return start, special
    return 0, ()

