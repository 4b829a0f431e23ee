#!/usr/bin/env python
"""Generate text from a trained run: `python launchers/generate.py --run runs/cola_tiny --prompt "ROMEO."`.

Cola DLM samples block by block (Euler steps of the DiT prior with classifier-free guidance,
KV caches in the DiT and the decoder); the AR baseline decodes token by token with a KV cache.
Sampling settings default to the run's `sample:` config section."""
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
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    a = p.parse_args()
    try:
        model, cfg, tok = load_run(a.run, a.device)
    except (FileNotFoundError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not can_sample(model):
        print(f"error: {a.run} is a stage-1 Cola run (VAE only, no prior to sample from); "
              "train stage 2 (configs/cola_tiny.yaml) first", file=sys.stderr)
        return 2
    s = dataclasses.replace(cfg.sample, **{k: v for k, v in {
        "prompt": a.prompt, "num_samples": a.num_samples, "max_new_tokens": a.max_new_tokens, "steps": a.steps,
        "guidance": a.guidance, "temperature": a.temperature, "top_k": a.top_k, "top_p": a.top_p}.items()
        if v is not None})
    for i, text in enumerate(generate_text(model, tok, [s.prompt] * s.num_samples, s, seed=a.seed)):
        print(f"--- sample {i} ---\n{s.prompt}{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
