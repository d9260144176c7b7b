"""Perplexity of a GGUF model built by kvplan, int4 against the dequantized model.

    python -m bench.gguf_perplexity GGUF --out ENGINES_DIR [--text FILE] [--tokens 1024]

Builds nothing: ``ENGINES_DIR/<model>/fp16`` and ``.../int4-awq`` must have been built from the GGUF
(``python -m build.engines --model GGUF --profile fp16|int4-awq --out ENGINES_DIR``). Each graph
(the fp16 target's fused graph on the dequantized weights, the int4 target's fused graph on the
file's own int4 blocks) runs in ONNX Runtime (int4 at accuracy level 0) over the text's first
``tokens`` tokens in one prefill; logits are hidden_out @ the GGUF's embedding (tied head) in
float32. transformers' own GGUF loading of the file in float32 is the dequantized model's figure.
Prints one JSON object.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from kvplan.decoder import pack_specs
from kvplan.export.exporter import causal_mask
from kvplan.models import resolve
from kvplan.validate.onnx_stack import OnnxStack, Pack

DEFAULT_TEXT = Path("/usr/share/common-licenses/Apache-2.0")


def perplexity(logits: torch.Tensor, ids: torch.Tensor) -> float:
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), ids[1:], reduction="mean")
    return math.exp(float(nll))


def graph_perplexity(source, graph: Path, dtype: torch.dtype, ids: torch.Tensor, embed, head) -> float:
    cfg = source.config
    n = ids.shape[0]
    hidden = embed[ids][None].to(dtype).numpy()
    past = [np.zeros((1, cfg.num_kv_heads, 0, cfg.head_dim), hidden.dtype) for _ in range(2 * cfg.num_layers)]
    stack = OnnxStack([Pack(pack_specs(cfg, 0)[0], graph)])
    out, _ = stack.step(hidden, causal_mask(1, n, 0, dtype).numpy(), np.arange(n)[None], past)
    stack.release()
    return perplexity(torch.from_numpy(out[0].astype(np.float32)) @ head.t(), ids)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gguf_perplexity", description=__doc__.split("\n\n")[0])
    p.add_argument("gguf", type=Path)
    p.add_argument("--out", type=Path, required=True, help="the engines directory the targets were built in")
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    p.add_argument("--tokens", type=int, default=1024)
    a = p.parse_args(argv)
    import transformers   # the independent reference; only this benchmark needs it here

    source = resolve(str(a.gguf))
    ids = torch.tensor(source.tokenizer().encode(a.text.read_text())[:a.tokens])
    lm = source.read_lm()
    embed, head = lm["embed_tokens.weight"], lm["lm_head.weight"]
    result = {"model": str(a.gguf), "text": str(a.text), "tokens": int(ids.shape[0])}
    t0 = time.perf_counter()
    model = transformers.AutoModelForCausalLM.from_pretrained(str(a.gguf.parent), gguf_file=a.gguf.name,
                                                              dtype=torch.float32).eval()
    with torch.no_grad():
        result["transformers_fp32_dequantized"] = perplexity(model(ids[None]).logits[0], ids)
    del model
    target = a.out / source.name
    for name, graph in (("kvplan_fp16_dequantized", target / "fp16" / "decoder.fused.onnx"),
                        ("kvplan_int4_gguf_blocks", target / "int4-awq" / "decoder.fused.onnx")):
        result[name] = graph_perplexity(source, graph, torch.float16, ids, embed, head)
    result["int4_vs_dequantized_fp32"] = result["kvplan_int4_gguf_blocks"] / result["transformers_fp32_dequantized"] - 1
    result["int4_vs_fp16_graph"] = result["kvplan_int4_gguf_blocks"] / result["kvplan_fp16_dequantized"] - 1
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps({k: round(v, 5) if isinstance(v, float) else v for k, v in result.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
