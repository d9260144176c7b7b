"""Decode speed of ``kvplan generate`` on the real trained model, beside transformers' own generate.

    python -m bench.generate --builds WORK [--prompt TEXT] [--new 64]

SmolLM2-135M-Instruct (bench/real_model.py) is built under WORK with the fp16 and int4-awq
profiles (whatever is current is reused), then, in one run on this machine:
- kvplan generate (ONNX Runtime on the fused graphs, embed.onnx and head.onnx; greedy), fp16 and
  int4 (MatMulNBits at accuracy levels 0 and 4);
- transformers' ``generate(do_sample=False)`` on the float32 model the checkpoint loads as, and on
  its float16 one, with its own cache.
Each row: the prompt's prefill time, decode tokens/s (the new tokens after the first over the
time after the prefill) and the text. Results go to bench/results/generate-<date>.{json,md}.
EOS is ignored on both sides (every run writes ``--new`` tokens) so the rows time the same work.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import transformers

from bench import real_model
from bench.common import ROOT, loadavg, log
from kvplan import generate as gen
from kvplan.runtime.steps import chunk_size, positions
from kvplan.target import BuildOptions, _current, build, decoder_packs

RESULTS = ROOT / "bench" / "results"
PROMPT = "Paris is the capital of"


def kvplan_row(ckpt: Path, profile: str, out: Path, prompt: str, new: int, accuracy: int) -> dict:
    build(str(ckpt), profile, out, BuildOptions(), log=lambda _: None)
    state = _current(str(ckpt), profile, out, (), "generated")
    options = gen.GenerateOptions(prompt, new, int4_accuracy=accuracy, backend="onnxruntime")
    model, _ = gen._model(state.source, state.profile, state.target, state.manifest, decoder_packs(state),
                          options, log)
    ids = gen.prompt_ids(state.source, options)
    run = gen.run(model, ids, new, chunk_size(state.profile), positions(state.source, state.profile))
    text = state.source.tokenizer().decode(run.ids)
    return {"runner": f"kvplan {profile}" + (f" (int4 accuracy {accuracy})" if "int4" in profile else ""),
            "prompt_tokens": len(ids), "new_tokens": len(run.ids), "prefill_s": round(run.prefill_seconds, 4),
            "decode_tokens_per_s": round(run.decode_tokens_per_second, 1), "text": text, "ids": run.ids}


def transformers_row(ckpt: Path, dtype: torch.dtype, prompt: str, new: int) -> dict:
    tok = transformers.AutoTokenizer.from_pretrained(str(ckpt))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(ckpt), dtype=dtype).eval()
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, **kw)                  # warm-up
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **kw)
        total = time.perf_counter() - t0
    got = out[0, ids.shape[1]:].tolist()
    return {"runner": f"transformers generate {str(dtype).removeprefix('torch.')}", "prompt_tokens": ids.shape[1],
            "new_tokens": len(got), "prefill_s": round(first, 4),
            "decode_tokens_per_s": round((len(got) - 1) / (total - first), 1),
            "text": tok.decode(got, skip_special_tokens=True), "ids": got}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--builds", type=Path, required=True)
    ap.add_argument("--prompt", default=PROMPT)
    ap.add_argument("--new", type=int, default=64)
    args = ap.parse_args(argv)
    ckpt = real_model.checkpoint_dir(real_model.gguf_file().parent)
    rows = [kvplan_row(ckpt, "fp16", args.builds, args.prompt, args.new, 0),
            kvplan_row(ckpt, "int4-awq", args.builds, args.prompt, args.new, 0),
            kvplan_row(ckpt, "int4-awq", args.builds, args.prompt, args.new, 4),
            transformers_row(ckpt, torch.float32, args.prompt, args.new),
            transformers_row(ckpt, torch.float16, args.prompt, args.new)]
    greedy = rows[3]["ids"]
    for r in rows:
        same = next((i for i, (a, b) in enumerate(zip(r["ids"], greedy)) if a != b), min(len(r["ids"]), len(greedy)))
        r["tokens_equal_to_transformers_fp32"] = same
    stamp = time.strftime("%Y-%m-%d")
    record = {"date": stamp, "model": str(ckpt), "prompt": args.prompt, "new_tokens": args.new,
              "threads": torch.get_num_threads(), "loadavg": loadavg(), "rows": rows}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"generate-{stamp}.json").write_text(json.dumps(record, indent=1))
    lines = [f"# kvplan generate against transformers' generate, {stamp}", "",
             f"SmolLM2-135M-Instruct, prompt {args.prompt!r}, {args.new} greedy tokens (EOS ignored), CPU, "
             f"{torch.get_num_threads()} threads, load {record['loadavg']}. `python -m bench.generate --builds WORK`.",
             "", "| runner | prefill s | decode tokens/s | first tokens equal to transformers fp32 |", "|---|---|---|---|"]
    lines += [f"| {r['runner']} | {r['prefill_s']} | {r['decode_tokens_per_s']} | "
              f"{r['tokens_equal_to_transformers_fp32']} of {r['new_tokens']} |" for r in rows]
    lines += ["", "Texts:", ""] + [f"- {r['runner']}: {r['text']!r}" for r in rows]
    (RESULTS / f"generate-{stamp}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
