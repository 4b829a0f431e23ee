#!/usr/bin/env python
"""Text sampled from a Hugging Face causal LM, each sample continuing the first tokens of a paragraph
of a prompt text: new training text for distilling that LM.

    python data_tools/sample_lm_text.py --model data/smollm2-135m --prompts data/wiki.test.txt \\
        --out data/wiki.gen.txt --samples 1024

Why: a Latent Flow Transformer's flow layer fits the content of the text it is trained on (on
SmolLM2 it is 0.79x skip-3's KL on its training text, 1.14x held out; docs/lft.md), and the
teacher labels any token sequence. Its own samples are text it can label at no cost of data:
continuations of in-domain paragraphs in the teacher's distribution, with new names and topics.
Measured there (docs/lft.md, "The teacher's own samples"): 1,024 samples moved the held-out KL by
0.2-1.3%, far less than as much real Wikipedia text did; real in-domain text is worth more.

Each sample is one line (the prompt's tokens and the continuation decoded together, newlines folded
to spaces), followed by a blank line as in WikiText. Prompts: the paragraphs (non-blank lines, not
"= headings =") of at least --prompt-tokens tokens, in file order, cycled when --samples exceeds them.
Batch b is sampled under seed (--seed, b), so the file is the same however often a run is
interrupted: rerunning appends what is missing (a partial batch is dropped first), and refuses an
--out written with other settings (they are kept in OUT.json)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lflm_dist.data import Tokenizer  # noqa: E402
from lflm_dist.data.corpus import sha256_file  # noqa: E402
from lflm_dist.eval.lft_metrics import read_text  # noqa: E402


def prompt_ids(text: str, tok: Tokenizer, n_tokens: int) -> list[list[int]]:
    """The first n_tokens tokens of each paragraph that has that many (headings left out)."""
    paragraphs = [p.strip() for p in text.split("\n") if p.strip() and not p.strip().startswith("=")]
    ids = [tok.encode(" " + p)[:n_tokens] for p in paragraphs]
    return [i for i in ids if len(i) == n_tokens]


def written_samples(out: Path, batch: int) -> int:
    """Samples in `out`, cut back to whole batches (a run killed mid-write leaves a partial one)."""
    if not out.is_file():
        return 0
    text = out.read_text(encoding="utf-8")
    lines = [line for line in text.split("\n") if line.strip()]
    keep = len(lines) // batch * batch
    if keep != len(lines) or not text.endswith("\n"):
        out.write_text("".join(f"{line}\n \n" for line in lines[:keep]), encoding="utf-8")
    return keep


def sample(model: Path, prompts: Path, out: Path, samples: int, prompt_tokens: int = 32, new_tokens: int = 224,
           batch: int = 64, seed: int = 0, temperature: float = 1.0, top_p: float = 0.95,
           tokenizer: Path | None = None) -> Path:
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM
    tok = Tokenizer.load(tokenizer or model / "tokenizer.json")
    settings = dict(model=str(model), model_sha256=sha256_file(model / "model.safetensors"),
                    tokenizer_sha256=tok.sha256, prompts=str(prompts), prompts_sha256=sha256_file(prompts),
                    prompt_tokens=prompt_tokens, new_tokens=new_tokens, batch=batch, seed=seed,
                    temperature=temperature, top_p=top_p)
    meta = out.with_name(out.name + ".json")
    if out.is_file():
        old = json.loads(meta.read_text()) if meta.is_file() else {}
        diff = {k: (old.get(k), v) for k, v in settings.items() if old.get(k) != v}
        if diff:
            raise SystemExit(f"{out} was sampled with other settings ({', '.join(f'{k}: {a} -> {b}' for k, (a, b) in diff.items())}); "
                             f"remove it (and {meta.name}) or pass another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(json.dumps(settings, indent=1) + "\n")
    pool = prompt_ids(read_text(prompts), tok, prompt_tokens)
    if not pool:
        raise SystemExit(f"{prompts}: no paragraph has {prompt_tokens} tokens; lower --prompt-tokens")
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    done = written_samples(out, batch)
    n_batches = -(-samples // batch)
    with open(out, "a", encoding="utf-8") as f, tqdm(total=n_batches * batch, initial=done, desc="sample",
                                                     unit="sample", dynamic_ncols=True) as bar:
        for b in range(done // batch, n_batches):
            x = torch.tensor([pool[(b * batch + i) % len(pool)] for i in range(batch)])
            torch.manual_seed(seed * 1_000_003 + b)
            with torch.no_grad():  # min_new_tokens: no EOS, every sample is prompt + new_tokens tokens
                y = lm.generate(x, attention_mask=torch.ones_like(x), do_sample=True, temperature=temperature,
                                top_p=top_p, top_k=0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                pad_token_id=tok.eos_id)
            lines = [" ".join(tok.decode(row.tolist()).split("\n")).strip() for row in y]
            f.write("".join(f" {line} \n \n" for line in lines))
            f.flush()
            bar.update(batch)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="a Hugging Face causal LM dir (config.json, model.safetensors)")
    p.add_argument("--tokenizer", type=Path, help="its tokenizer.json (default: MODEL/tokenizer.json)")
    p.add_argument("--prompts", type=Path, required=True, help="text or .gz file whose paragraphs start the samples")
    p.add_argument("--out", type=Path, required=True, help="text file the samples are appended to")
    p.add_argument("--samples", type=int, required=True, help="how many (rounded up to whole batches)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=224, help="tokens sampled after each prompt")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=0.95)
    a = p.parse_args(argv)
    out = sample(a.model, a.prompts, a.out, a.samples, a.prompt_tokens, a.new_tokens, a.batch, a.seed,
                 a.temperature, a.top_p, a.tokenizer)
    print(out)


if __name__ == "__main__":
    main()
