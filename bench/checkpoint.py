"""Write a Llama-architecture Hugging Face checkpoint directory with kvplan's seeded random weights.

    python -m bench.checkpoint OUT_DIR [--preset minicpmo26-tts] [--dtype float16]

config.json = kvplan.models.families.hf_config_dict(cfg) (LlamaForCausalLM), model.safetensors with ``model.`` +
decoder tensor names plus model.embed_tokens.weight and lm_head.weight, generation_config.json and a
tiny word-level tokenizer (tokenizer.json + tokenizer_config.json, built offline with `tokenizers`)
so that peer exporters that save a tokenizer next to the model do not try the hub.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def write_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    n = min(vocab_size, 1000)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for i in range(3, n):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "model_max_length": 4096, "clean_up_tokenization_spaces": False}, indent=1))
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=1))


def write_checkpoint(out: Path, preset: str = "minicpmo26-tts", dtype: str = "float16") -> dict:
    import torch
    from safetensors.torch import save_file

    from kvplan.models import resolve
    from kvplan.models.families import hf_config_dict as to_hf_dict
    from kvplan.models.presets import tensor_shapes

    src = resolve(preset)
    cfg = src.config
    out.mkdir(parents=True, exist_ok=True)
    tdtype = getattr(torch, dtype)
    names = sorted(tensor_shapes(cfg))
    tensors = {"model." + n: t.to(tdtype).contiguous() for n, t in src.read_tensors(names).items()}
    lm = src.read_lm()
    tensors["model.embed_tokens.weight"] = lm["embed_tokens.weight"].to(tdtype).contiguous()
    tensors["lm_head.weight"] = lm["lm_head.weight"].to(tdtype).contiguous()
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    hf = to_hf_dict(cfg)
    hf["architectures"] = ["LlamaForCausalLM"]
    hf.update({"torch_dtype": dtype, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
               "attention_dropout": 0.0, "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True})
    (out / "config.json").write_text(json.dumps(hf, indent=1))
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}, indent=1))
    write_tokenizer(out, cfg.vocab_size or 32000)
    params = sum(t.numel() for t in tensors.values())
    return {"dir": str(out), "preset_shape": preset, "dtype": dtype, "parameters": params,
            "bytes": (out / "model.safetensors").stat().st_size, "config": hf}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.checkpoint")
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="minicpmo26-tts")
    p.add_argument("--dtype", default="float16")
    a = p.parse_args(argv)
    print(json.dumps(write_checkpoint(a.out, a.preset, a.dtype)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
