"""The command line: ``kvplan build | validate | eval | surgery | inspect | presets``.

Every command parses its flags into the options of the module that does the work
(``kvplan.target``, ``kvplan.surgery``, ``kvplan.trt``) and catches ``KvplanError``
once, here: the message on one line and exit 2. Anything else is a bug and keeps its
traceback. ``python -m build.engines`` and ``python -m build.validate`` from the
repository root are the ``build`` and ``validate`` commands under their original names.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

from kvplan.errors import KvplanError, UserError
from kvplan.lazy import lazy_import

# Each command's modules, imported when it runs: `kvplan presets` and `--help` load none of them.
generate_mod = lazy_import("kvplan.generate")
inspection = lazy_import("kvplan.trt.inspection")
manifest = lazy_import("kvplan.manifest")
models = lazy_import("kvplan.models")
perplexity = lazy_import("kvplan.validate.perplexity")
preset_configs = lazy_import("kvplan.models.presets")
profiles_mod = lazy_import("kvplan.profiles")
surgery_cli = lazy_import("kvplan.surgery.cli")
target_mod = lazy_import("kvplan.target")
trt_backend = lazy_import("kvplan.trt.backend")
validate_run = lazy_import("kvplan.validate.run")
validate_tokens = lazy_import("kvplan.validate.tokens")

BACKENDS = ("auto", "tensorrt", "tensorrt-rtx")
TEXT_HELP = ("a UTF-8 text file whose tokens (read with the model's own tokenizer) every validation point is "
             "fed, as the model's embeddings of them; recorded in manifest.json with its sha256 (default: the "
             "text kvplan ships; a model without a tokenizer is fed seeded token ids)")
INTERRUPTED = ("interrupted: no partial artifact was kept; the manifest does not claim the interrupted stage")


def _log(msg: str) -> None:
    print(msg, flush=True)


def _target_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", default=profiles_mod.DEFAULT_PROFILE,
                   help="build profile: a shipped name (fp16, bf16, fp32, ...) or a path to a .toml "
                        "(default: %(default)s)")
    p.add_argument("--model", default=models.DEFAULT_MODEL,
                   help="a preset name (seeded random weights), a local checkpoint directory (Hugging Face "
                        "Llama, Mistral, Qwen2, Qwen3, Gemma 2, Phi-3, their AutoAWQ/GPTQ int4 exports, or "
                        "MiniCPM-o-2_6's TTS decoder), or a .gguf file (default: %(default)s)")
    p.add_argument("--out", default="engines", type=Path,
                   help="output root; artifacts go to OUT/<model>/<profile>/ (default: %(default)s)")
    p.add_argument("--shapes", action="append", default=[], metavar="NAME:N=min,opt,max:lastSum=min,opt,max",
                   help="size an optimization profile of the build profile (either axis may be left out; a new "
                        "NAME adds a profile), e.g. prefill:N=1,128,512:lastSum=0,0,1536; repeatable; B=1,2,4 gives "
                        "every optimization profile that batch range (a dynamic batch axis). A shipped "
                        "profile is otherwise fitted to a model with fewer positions than it is sized for")


def build_parser(prog: str = "kvplan build") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Export a Llama-family decoder stack to ONNX with a flattened KV cache, fuse it, "
                    "and build TensorRT engines with dynamic-shape profiles for N and lastSum.")
    _target_flags(p)
    p.add_argument("--backend", default="auto", choices=BACKENDS,
                   help="TensorRT flavour for the engines stage: auto takes, of the installed ones, one whose "
                        "builder can run here (full TensorRT's needs a GPU; TensorRT-RTX builds without one), "
                        "then the one with every feature kvplan uses (default: %(default)s)")
    p.add_argument("--no-surgery", action="store_true",
                   help="build the engine from the exported graph as is (same as an empty [surgery] passes list)")
    p.add_argument("--stop-after", choices=target_mod.STAGES[:-1], default=None,
                   help="stop after this stage (default: run every stage)")
    p.add_argument("--validate", action="store_true",
                   help="after building, check every stage's numbers (same as kvplan validate)")
    p.add_argument("--text", type=Path, default=None, metavar="FILE", help="with --validate: " + TEXT_HELP)
    p.add_argument("--force", action="store_true", help="rebuild every stage even when its inputs are unchanged")
    p.add_argument("--one-process", action="store_true",
                   help="run every stage in this process (for a debugger or profiler); by default the stages "
                        "before the engines, and the engines, each run in a forked process of their own, so that "
                        "the build's peak memory is its largest stage's instead of the engine builder's on top of "
                        "the export's libraries")
    # Kept so that scripts written for the traced exporter keep working: nothing is traced now.
    p.add_argument("--no-trace-cache", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--allow-nonfinite-weights", action="store_true",
                   help="export weights holding NaN or infinite values, or values beyond the profile dtype's range "
                        "(infinite once cast), instead of refusing them; the manifest records it, and validation "
                        "(--validate, or kvplan validate later, without the flag) fails on the outputs they make "
                        "non-finite")
    p.add_argument("--inspect", metavar="PLAN_OR_TARGET", type=Path,
                   help="print the layer summary of a built .plan (or of the plan(s) in a target directory) and exit")
    p.add_argument("--list-presets", action="store_true", help="list the model presets and exit")
    p.add_argument("--print-deps", action="store_true",
                   help="print, as JSON, the target directory, its manifest and the files the build depends on "
                        "(profile, model files, kvplan sources) and exit; used by CMakeLists.txt")
    return p


def validate_parser(prog: str = "kvplan validate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Check a built target's ONNX graphs and engines against transformers' "
                                            "model with Polygraphy; never rebuilds. Exit codes: 0 pass, 1 numeric "
                                            "mismatch, 2 stale/missing target or bad input, 3 inconclusive.")
    _target_flags(p)
    p.add_argument("--backend", default=None, choices=BACKENDS,
                   help="TensorRT flavour (default: the one that built the engine)")
    p.add_argument("--no-surgery", action="store_true", help="the target was built with --no-surgery")
    p.add_argument("--points", default="all",
                   help="comma list of min, opt, max, masked, batch (a profile with a batch range: rows of "
                        "different lengths) per optimization profile, or all (default: all)")
    p.add_argument("--prefill-dtype", choices=("float32", "profile"), default="float32",
                   help="precision of the prefill that produces the past KV (input data, not under test): "
                        "float32 (fast on CPU, then rounded to the profile dtype) or the profile's own "
                        "(default: %(default)s)")
    p.add_argument("--reference-dtype", choices=("float32", "profile"), default="float32",
                   help="precision transformers' reference computes in, on the profile dtype's weights and "
                        "inputs: float32 (exact arithmetic on the same numbers; outputs rounded to the profile "
                        "dtype) or the profile's own (default: %(default)s)")
    p.add_argument("--steps", type=int, default=64, help="decode steps of the token/multi-step checks (default: 64)")
    p.add_argument("--prompt-tokens", type=int, default=8, help="prompt length of the token check (default: 8)")
    p.add_argument("--no-task", action="store_true", help="skip the token-agreement and multi-step checks")
    p.add_argument("--text", type=Path, default=None, metavar="FILE", help=TEXT_HELP)
    p.add_argument("--min-agreement", type=float, default=0.95,
                   help="lowest teacher-forced top-1 agreement that passes (default: %(default)s)")
    p.add_argument("--layer-ranges", type=_layer_ranges, default="auto", metavar="K",
                   help="run every runner over a single-pack graph K layers ranges at a time, each range fed "
                        "the runner's own output of the one before (what the whole graph computes), so only "
                        "one range's weights are in memory; auto: ranges of about 64 MiB of weights; 0 or 1: "
                        "the whole stack at once (default: %(default)s)")
    p.add_argument("--full", action="store_true", help="print one table row per output tensor")
    p.add_argument("--verbose", action="store_true", help="keep Polygraphy's own log")
    return p


def eval_parser(prog: str = "kvplan eval") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Perplexity of a text through a built target's ONNX graphs (ONNX "
                                            "Runtime; the checkpoint's embedding and LM head), with top-1 agreement "
                                            "and mean KL against transformers' float32 model; never rebuilds. The "
                                            "last line is 'perplexity: X (K tokens)'.")
    _target_flags(p)
    p.add_argument("--text", type=Path, required=True, help="a UTF-8 text, tokenized with the checkpoint's tokenizer")
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the text to score (default: %(default)s)")
    p.add_argument("--graph", choices=target_mod.GRAPH_CHOICES, default="fused",
                   help="fused: the graphs the engines are built from (default); exported: the export's (int4 "
                        "where quantized)")
    p.add_argument("--no-reference", action="store_true",
                   help="skip transformers' float32 model (no top-1 agreement or KL)")
    p.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    return p


def generate_parser(prog: str = "kvplan generate") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog,
                                description="Generate text with a built target: the checkpoint's tokenizer, then "
                                            "embed -> decoder -> head step by step (TensorRT where this machine runs "
                                            "the plans, else ONNX Runtime on the graphs); the text streams to "
                                            "stdout, the figures (tokens/s for prefill and decode) to stderr. "
                                            "Never rebuilds.")
    _target_flags(p)
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the checkpoint's chat "
                                                       "template, ready for the reply")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); above: sample")
    p.add_argument("--top-k", type=int, default=0, help="sample from the k likeliest tokens (0: all; default)")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed (default: %(default)s)")
    p.add_argument("--backend", default="auto", choices=generate_mod.GENERATE_BACKENDS,
                   help="auto: TensorRT where the plans run here, else ONNX Runtime (default: %(default)s)")
    p.add_argument("--graph", choices=target_mod.GRAPH_CHOICES, default="fused",
                   help="ONNX Runtime: the decoder graphs to run (default: %(default)s)")
    p.add_argument("--int4-accuracy", type=int, choices=(0, 4), default=0,
                   help="ONNX Runtime's int4 MatMulNBits accuracy level: 0 computes in the graph's precision, 4 "
                        "quantizes activations to int8 (default: %(default)s)")
    return p


def inspect_parser(prog: str = "kvplan inspect") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Print the layer summary of built plans.")
    p.add_argument("plan", type=Path, help="a .plan file, or a target directory holding plans")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="TensorRT flavour (default: %(default)s)")
    return p


def _guarded(run: Callable[[], int]) -> int:
    """The one place kvplan's errors become exit codes."""
    try:
        return run()
    except KvplanError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:     # a read-only or full --out, a file that vanished: the message names it
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130


def _inspect(path: Path, backend_name: str) -> int:
    plans = sorted(path.glob("*.plan")) if path.is_dir() else [path]
    if not plans or not all(p.exists() for p in plans):
        raise UserError(f"{path}: no .plan found")
    backend = trt_backend.select_backend(backend_name)
    for plan in plans:
        inspection.inspect(plan, backend, log=_log)
    return 0


def _presets() -> int:
    for name, cfg in preset_configs.PRESETS.items():
        print(f"{name:20s} {cfg.family:8s} layers={cfg.num_layers} hidden={cfg.hidden_size} "
              f"heads={cfg.num_heads}/{cfg.num_kv_heads} head_dim={cfg.head_dim}")
    return 0


def _layer_ranges(text: str):
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not auto or a number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} is below 0")
    return value


def _validate_options(args: argparse.Namespace) -> "validate_run.ValidateOptions":
    return validate_run.ValidateOptions(points=args.points, prefill_dtype=args.prefill_dtype,
                           reference_dtype=args.reference_dtype, steps=args.steps,
                           prompt_tokens=args.prompt_tokens, no_task=args.no_task,
                           min_agreement=args.min_agreement, full=args.full, verbose=args.verbose,
                           layer_ranges=args.layer_ranges, text=args.text)


def _build(args: argparse.Namespace) -> int:
    if args.list_presets:
        return _presets()
    if args.inspect is not None:
        return _inspect(args.inspect, args.backend)
    if args.print_deps:
        source, profile, target = target_mod.resolve_target(args.model, args.profile, args.out, tuple(args.shapes))
        print(json.dumps(target_mod.dependencies(source, profile, target), indent=1))
        return 0
    if args.text is not None and not args.validate:
        raise UserError("--text is what validation feeds the model: it needs --validate")
    if args.text is not None:
        validate_tokens.read_text(args.text)          # a file that cannot be read fails before the build, not minutes after
    if args.no_trace_cache:
        _log("kvplan: --no-trace-cache has no effect: the exporter writes the graph directly and traces nothing")
    options = target_mod.BuildOptions(backend=args.backend, no_surgery=args.no_surgery, stop_after=args.stop_after,
                                      force=args.force, shapes=tuple(args.shapes), allow_nonfinite=args.allow_nonfinite_weights,
                                      fork=not args.one_process)
    target_mod.build(args.model, args.profile, args.out, options, log=_log)
    if args.validate:
        return target_mod.validate_target(args.model, args.profile, args.out, validate_run.ValidateOptions(text=args.text),
                                          backend=args.backend, no_surgery=args.no_surgery,
                                          shapes=tuple(args.shapes), log=_log)
    return 0


def build_main(argv: list[str] | None = None, prog: str = "kvplan build") -> int:
    args = build_parser(prog).parse_args(argv)
    return _guarded(lambda: _build(args))


def validate_main(argv: list[str] | None = None, prog: str = "kvplan validate") -> int:
    args = validate_parser(prog).parse_args(argv)
    return _guarded(lambda: target_mod.validate_target(args.model, args.profile, args.out, _validate_options(args),
                                                       backend=args.backend, no_surgery=args.no_surgery,
                                                       shapes=tuple(args.shapes), log=_log))


def _eval(args: argparse.Namespace) -> int:
    result = target_mod.eval_target(args.model, args.profile, args.out, args.text, args.tokens,
                                    reference=not args.no_reference, graph=args.graph, shapes=tuple(args.shapes),
                                    log=_log)
    if args.json:
        manifest.write_json_atomic(args.json, result)
    for line in perplexity.summary(result):
        print(line)
    return 0


def eval_main(argv: list[str] | None = None, prog: str = "kvplan eval") -> int:
    args = eval_parser(prog).parse_args(argv)
    return _guarded(lambda: _eval(args))


def _generate(args: argparse.Namespace) -> int:
    sampling = generate_mod.Sampling(args.temperature, args.top_k, args.seed)
    options = generate_mod.GenerateOptions(args.prompt, args.max_new_tokens, sampling, args.chat, args.backend,
                                           args.graph, args.int4_accuracy, tuple(args.shapes))
    err = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
    result = target_mod.generate_target(args.model, args.profile, args.out, options, write, log=err)
    sys.stdout.write("\n")
    err(generate_mod.summary(result))
    return 0


def generate_main(argv: list[str] | None = None, prog: str = "kvplan generate") -> int:
    args = generate_parser(prog).parse_args(argv)
    return _guarded(lambda: _generate(args))


def inspect_main(argv: list[str] | None = None) -> int:
    args = inspect_parser().parse_args(argv)
    return _guarded(lambda: _inspect(args.plan, args.backend))


COMMANDS = {
    "build": (build_main, "export, fuse and build engines for a model and profile"),
    "validate": (validate_main, "check a built target against transformers with Polygraphy"),
    "eval": (eval_main, "perplexity of a text through a built target's graphs"),
    "generate": (generate_main, "generate text with a built target, token by token"),
    "surgery": (lambda argv: surgery_cli.main(argv, prog="kvplan surgery"), "fuse one ONNX graph"),
    "inspect": (inspect_main, "print the layer summary of built plans"),
    "presets": (lambda argv: _presets(), "list the model presets"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: kvplan {" + ",".join(COMMANDS) + "} [--help | options]\n")
        for name, (_, what) in COMMANDS.items():
            print(f"  {name:10s} {what}")
        known = not argv or argv[0] in ("-h", "--help")
        if not known:
            print(f"\nerror: unknown command {argv[0]!r}", file=sys.stderr)
        return 0 if known else 2
    return COMMANDS[argv[0]][0](argv[1:])
