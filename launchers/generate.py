#!/usr/bin/env python
"""Generate text from a trained run: `python launchers/generate.py --run runs/cola_tiny --prompt "ROMEO."`.

Each family samples its own way: Cola DLM block by block (Euler steps of the DiT prior with
classifier-free guidance, KV caches in the DiT and the decoder); LFLM draws z ~ N(0, I), flows it
through its ODE and decodes every position at once (a prompt selects z by importance resampling);
the AR baseline decodes token by token with a KV cache. Sampling settings default to the run's
`sample:` config section.

Latent tools, for families with one latent per text (LFLM):
  --reconstruct TEXT            greedy decode of the text's posterior mean (any latent family)
  --interpolate A B [--points N] decodes along the path between the latents of texts A and B
  --arithmetic A B C            decode of latent(A) - latent(B) + latent(C)
Continuous-space editing (TarFlowLM):
  --edit TEXT OLD NEW           replace the first OLD in TEXT by NEW (as many tokens) in latent
                                space and re-decode what follows from the text's own base noise"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lflm_dist.generate import can_sample, generate_text, load_run  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, help="run dir written by launchers/pretrain.py")
    p.add_argument("--prompt", default=None, help="text to continue (default: the run's sample.prompt)")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--steps", type=int, default=None, help="Euler steps per latent block (Cola)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale, 1 = off (Cola)")
    p.add_argument("--churn", type=float, default=None,
                   help="fraction of each Euler step's noise re-drawn, 0 = the deterministic ODE (Cola)")
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--reconstruct", metavar="TEXT", default=None, help="reconstruct TEXT through the latent")
    p.add_argument("--interpolate", nargs=2, metavar=("A", "B"), default=None, help="interpolate between two texts")
    p.add_argument("--points", type=int, default=5, help="points of --interpolate, endpoints included")
    p.add_argument("--arithmetic", nargs=3, metavar=("A", "B", "C"), default=None, help="decode z(A) - z(B) + z(C)")
    p.add_argument("--edit", nargs=3, metavar=("TEXT", "OLD", "NEW"), default=None,
                   help="replace OLD by NEW in TEXT in latent space; what follows is re-generated")
    a = p.parse_args()
    try:
        model, cfg, tok = load_run(a.run, a.device)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.reconstruct is not None or a.interpolate or a.arithmetic or a.edit:
        return latent_tools(model, tok, a)
    if not can_sample(model):
        print(f"error: {a.run}: {model.sampling_unavailable()}", file=sys.stderr)
        return 2
    s = dataclasses.replace(cfg.sample, **{k: v for k, v in {
        "prompt": a.prompt, "num_samples": a.num_samples, "max_new_tokens": a.max_new_tokens, "steps": a.steps,
        "guidance": a.guidance, "churn": a.churn, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p}.items()
        if v is not None})
    try:
        s.validate()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, text in enumerate(generate_text(model, tok, [s.prompt] * s.num_samples, s, seed=a.seed)):
        print(f"--- sample {i} ---\n{s.prompt}{text}\n")
    return 0


def latent_tools(model, tok, a) -> int:
    import torch
    dev = next(model.parameters()).device

    def ids(text: str) -> torch.Tensor:
        return torch.tensor([tok.encode(text)], device=dev)

    def show(toks: list[int]) -> str:
        return tok.decode(toks).split(tok.decode([tok.eos_id]))[0]  # the end token ends the text

    try:
        if a.reconstruct is not None:
            print(f"[in ] {a.reconstruct!r}\n[out] {show(model.reconstruct(ids(a.reconstruct))[0].tolist())!r}")
        if a.interpolate:
            for i, t in enumerate(model.interpolate(ids(a.interpolate[0]), ids(a.interpolate[1]), a.points)):
                print(f"[{i / max(1, a.points - 1):.2f}] {show(t)!r}")
        if a.arithmetic:
            x, y, z = a.arithmetic
            print(f"z({x!r}) - z({y!r}) + z({z!r}) -> {show(model.latent_arithmetic(ids(x), ids(y), ids(z))[0])!r}")
        if a.edit:
            text, old, new = a.edit
            i = text.find(old)
            if i < 0:
                print(f"error: --edit: {old!r} does not occur in {text!r}", file=sys.stderr)
                return 2
            pre, old_ids, new_ids = tok.encode(text[:i]), tok.encode(old), tok.encode(new)
            if len(old_ids) != len(new_ids):
                print(f"error: --edit keeps the text's length: {old!r} is {len(old_ids)} tokens, {new!r} is "
                      f"{len(new_ids)}", file=sys.stderr)
                return 2
            x = torch.tensor([pre + old_ids + tok.encode(text[i + len(old):])], device=dev)
            out = model.edit(x, len(pre), torch.tensor([new_ids], device=dev))
            print(f"[in    ] {text!r}\n[edited] {show(out[0].tolist())!r}")
    except NotImplementedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
