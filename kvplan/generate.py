"""``kvplan generate``: text from a built target, token by token, as a deployment runs it.

The prompt (the checkpoint's tokenizer; ``--chat``: its chat template) is prefilled in chunks as
large as the engine's biggest optimization profile takes, then one token a step: embed -> decoder
-> head, the cache fed back as the target's kv_io mode wants (kvplan.runtime.cache). Greedy unless
a temperature is given; sampling draws from the ``top_k`` likeliest (all, when 0) with a seeded
generator. The text is streamed as it comes; the figures go to the caller.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from kvplan.embed_head.stage import end_graphs
from kvplan.errors import BackendError, UserError
from kvplan.lazy import lazy_import
from kvplan.runtime import onnx as ort_model
from kvplan.runtime.cache import Traffic
from kvplan.runtime.steps import chunk_size, positions
from kvplan.stack import export_specs
from kvplan.trt.backend import select_backend

# Loaded only where plans are to run: it imports TensorRT through Polygraphy.
trt_model = lazy_import("kvplan.validate.trt_model")


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0     # 0: greedy
    top_k: int = 0               # 0: the whole vocabulary (or what the head graph returns)
    seed: int = 0

    def __post_init__(self):
        if not self.temperature >= 0 or self.temperature == float("inf"):
            raise UserError(f"--temperature {self.temperature}: must be a finite number >= 0")
        if self.top_k < 0:
            raise UserError(f"--top-k {self.top_k}: must be >= 0")


def pick(out: dict[str, np.ndarray], sampling: Sampling, rng: np.random.Generator) -> int:
    """The next token from the head graph's outputs for the last position (logits, or top_values
    and top_ids where the head returns only the k largest)."""
    if "logits" in out:
        logits = out["logits"][0, -1].astype(np.float32)
        ids = None
    else:
        logits, ids = out["top_values"][0, -1].astype(np.float32), out["top_ids"][0, -1]
    if not np.isfinite(logits).all():
        raise UserError("the head returned non-finite logits: the target computes NaN or inf here")
    if sampling.temperature == 0:
        best = int(np.argmax(logits))
        return int(ids[best]) if ids is not None else best
    keep = np.arange(logits.shape[0])
    if sampling.top_k and sampling.top_k < logits.shape[0]:
        keep = np.argpartition(-logits, sampling.top_k - 1)[:sampling.top_k]
    z = logits[keep] / sampling.temperature
    p = np.exp(z - z.max())
    choice = int(keep[rng.choice(len(keep), p=p / p.sum())])
    return int(ids[choice]) if ids is not None else choice


@dataclass
class Generated:
    ids: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    stopped: str                      # "eos" or "max-new-tokens"
    traffic: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_second(self) -> float:
        # The first new token comes from the prefill; the decode steps make the rest.
        steps = len(self.ids) - 1
        return steps / self.decode_seconds if steps and self.decode_seconds else 0.0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0


def run(model, prompt: list[int], max_new: int, chunk: int, capacity: int, sampling: Sampling = Sampling(),
        eos: tuple[int, ...] = (), on_token: Callable[[int], None] = lambda _: None) -> Generated:
    """Generate up to ``max_new`` tokens after ``prompt`` through ``model`` (kvplan.runtime.onnx's
    OnnxModel, or any with its embed/decode/head/new_cache)."""
    rng = np.random.default_rng(sampling.seed)
    cache = model.new_cache(capacity)
    t0 = time.perf_counter()
    for start in range(0, len(prompt), chunk):
        hidden = model.decode(model.embed(np.array([prompt[start:start + chunk]])), cache)
    token = pick(model.head(hidden[:, -1:]), sampling, rng)
    prefill = time.perf_counter() - t0
    cache.traffic = Traffic()          # what the decode steps cost the cache, without the prefill's
    out, stopped = [token], "max-new-tokens"
    on_token(token)
    t0 = time.perf_counter()
    while len(out) < max_new:
        if token in eos:
            stopped = "eos"
            break
        hidden = model.decode(model.embed(np.array([[token]])), cache)
        token = pick(model.head(hidden), sampling, rng)
        out.append(token)
        on_token(token)
    else:
        if token in eos:
            stopped = "eos"
    return Generated(out, len(prompt), prefill, time.perf_counter() - t0, stopped, cache.traffic.per_step())


class TextStream:
    """Decoded text as the tokens come: what is new since the last call, held back while the
    tokens so far end inside a multi-byte character (the tokenizer gives U+FFFD for it)."""

    def __init__(self, decode: Callable[[list[int]], str], write: Callable[[str], None]):
        self.decode, self.write, self.ids, self.shown = decode, write, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.decode(self.ids)
        if text.endswith("\ufffd"):
            return
        if text.startswith(self.shown):
            self.write(text[len(self.shown):])
        self.shown = text

    def text(self) -> str:
        return self.decode(self.ids)


GENERATE_BACKENDS = ("auto", "onnxruntime", "tensorrt")


@dataclass(frozen=True)
class GenerateOptions:
    prompt: str
    max_new_tokens: int = 64
    sampling: Sampling = Sampling()
    chat: bool = False
    backend: str = "auto"            # auto: TensorRT where this machine runs the plans, else ONNX Runtime
    graph: str = "fused"             # ONNX Runtime: the decoder graphs (kvplan.target.decoder_packs)
    int4_accuracy: int = 0           # ONNX Runtime's MatMulNBits accuracy level for int4 graphs
    shapes: tuple[str, ...] = ()
    threads: int = 0


def prompt_ids(source, options: GenerateOptions) -> list[int]:
    if not options.prompt:
        raise UserError("--prompt: empty; give the text to continue")
    if source.tokenizer is None:
        raise UserError(f"{source.path or source.name}: ships no tokenizer (tokenizer.json, tokenizer.model or a "
                        f"GGUF's vocabulary) to turn the prompt into tokens")
    tok = source.tokenizer()
    return tok.chat(options.prompt) if options.chat else tok.encode(options.prompt)


def check_lengths(prompt: int, max_new: int, capacity: int) -> None:
    if max_new < 1:
        raise UserError(f"--max-new-tokens {max_new}: must be >= 1")
    if prompt > capacity:
        raise UserError(f"--prompt: {prompt} tokens; the target's optimization profiles take at most {capacity} "
                        f"positions (N max + lastSum max)")
    # The last new token is not fed back: prompt + max_new - 1 positions are run.
    if prompt + max_new - 1 > capacity:
        raise UserError(f"--max-new-tokens {max_new}: with the prompt's {prompt} tokens that runs past the "
                        f"{capacity} positions the target takes; at most {capacity - prompt + 1}")


def _model(source, profile, target, manifest, packs, options: GenerateOptions, log):
    """(the runtime model, its backend's name) for the target, as ``options.backend`` asks."""
    ends = end_graphs(manifest["stages"].get("embed_head"))
    if "embed" not in ends or "head" not in ends:
        raise UserError(f"{target}: has no embed.onnx and head.onnx (the model source holds no embedding and LM "
                        f"head), so nothing turns the decoder's output into tokens")
    if options.backend in ("auto", "tensorrt"):
        engines = manifest["stages"].get("engines")
        model, why = _tensorrt_model(engines, source, profile, target) if engines else (None, "no engines built")
        if model is not None:
            return model, "tensorrt"
        if options.backend == "tensorrt":
            raise UserError(f"--backend tensorrt: {why}")
        log(f"kvplan: the plans cannot run here ({why}): ONNX Runtime runs the ONNX graphs")
    graphs = ort_model.Graphs([(p.spec, p.path) for p in packs], target / ends["embed"]["path"],
                              target / ends["head"]["path"])
    try:
        model = ort_model.OnnxModel(graphs, source.config, profile.dtype, options.threads, options.int4_accuracy)
    except ValueError as e:
        raise UserError(f"{profile.source}: {e}") from None
    return model, "onnxruntime"


def _tensorrt_model(engines: dict, source, profile, target):
    try:
        backend = select_backend(engines.get("backend", "auto"))
    except BackendError as e:
        return None, str(e)
    if not backend.can_run:
        return None, f"{backend.name} {backend.version}: {backend.why_not_run}"
    plans = sorted((a for a in engines["artifacts"] if "pack" in a), key=lambda a: a["pack"])
    ends = {a["graph"]: target / a["path"] for a in engines["artifacts"] if "graph" in a}
    try:
        return trt_model.TensorRtModel([target / a["path"] for a in plans], ends["embed"], ends["head"],
                             export_specs(source.config, profile.export), profile, backend, source.config), ""
    except RuntimeError as e:
        return None, str(e)


def from_target(source, profile, target, manifest, packs, options: GenerateOptions, write: Callable[[str], None],
                log: Callable[[str], None]) -> Generated:
    """Generate from a built (and checked current) target; the text goes to ``write`` as it comes."""
    ids = prompt_ids(source, options)
    capacity = positions(source, profile)
    check_lengths(len(ids), options.max_new_tokens, capacity)
    model, backend = _model(source, profile, target, manifest, packs, options, log)
    tok = source.tokenizer()
    stream = TextStream(tok.decode, write)
    log(f"kvplan: {len(ids)} prompt tokens through {target} ({backend}, kv_io {profile.export.kv_io}, "
        f"{profile.dtype}); up to {options.max_new_tokens} new")
    result = run(model, ids, options.max_new_tokens, chunk_size(profile), capacity, options.sampling,
                 tok.eos_ids, stream)
    result.traffic.update(backend=backend, kv_io=profile.export.kv_io)
    return result


def summary(result: Generated) -> str:
    t = result.traffic
    return (f"prefill: {result.prompt_tokens} tokens in {result.prefill_seconds:.2f} s "
            f"({result.prefill_tokens_per_second:.1f} tokens/s); decode: {len(result.ids) - 1} tokens in "
            f"{result.decode_seconds:.2f} s ({result.decode_tokens_per_second:.1f} tokens/s); stopped at "
            f"{result.stopped}; {t.get('backend')}, kv_io {t.get('kv_io')}: cache bytes copied per step "
            f"{t.get('copied_bytes_per_step', 0)}, written per step {t.get('written_bytes_per_step', 0)}")
