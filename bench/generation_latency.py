#!/usr/bin/env python
"""Generation latency: time per generated token of Cola DLM (block-wise: `steps` Euler steps of
the DiT per block, classifier-free guidance, KV caches in the DiT and the decoder) vs the AR
baseline (token by token with a KV cache), both at their tiny configs (configs/cola_tiny.yaml,
configs/ar_tiny.yaml: about equal parameters), random init, vocab 2048. Timing needs no
training: the work per token does not depend on the weights.

ms/token = wall time of `model.sample` / new tokens (per sequence; at batch B every sequence
gets that many tokens in the same time, so throughput = B / (ms/token)). Each setting is timed
`--repeats` times after a warm-up; the median is reported. Prints a table and writes JSON.

    python bench/generation_latency.py [--batch-sizes 1,16] [--new-tokens 64] [--threads 1]"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def build(config: str, vocab: int, device):
    from lflm_dist.config import load_config
    from lflm_dist.models.registry import build_model, count_params
    over = [f"model.vocab_size={vocab}"]
    if "cola" in config:
        over += ["model.cola.lambda_ref=0", "model.cola.ref_checkpoint=", "model.cola.latent_stats=identity"]
    cfg = load_config(ROOT / config, over)
    m = build_model(cfg.model, init_pretrained=False).to(device).eval()
    return m, cfg, count_params(m)


def time_sample(model, batch: int, new_tokens: int, prompt_len: int, repeats: int, device, **kw) -> float:
    import torch
    g = torch.Generator(device=device).manual_seed(0)
    prompts = torch.randint(1, 2000, (batch, prompt_len), generator=torch.Generator().manual_seed(1)).tolist()
    model.sample(prompts, min(new_tokens, 16), generator=g, pad_id=0, **kw)  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.sample(prompts, new_tokens, generator=g, pad_id=0, **kw)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        assert len(out) == batch and len(out[0]) == new_tokens
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--cola-settings", default="8:2.0,8:1.0,4:1.0",
                   help="comma-separated steps:guidance pairs for Cola DLM")
    p.add_argument("--vocab", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(ROOT / "bench/results/generation_latency.json"))
    a = p.parse_args()

    import torch
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    cola, ccfg, cola_params = build("configs/cola_tiny.yaml", a.vocab, device)
    ar, acfg, ar_params = build("configs/ar_tiny.yaml", a.vocab, device)
    settings = [(int(s.split(":")[0]), float(s.split(":")[1])) for s in a.cola_settings.split(",")]
    rows = []
    with torch.no_grad():
        for b in (int(x) for x in a.batch_sizes.split(",")):
            t_ar = time_sample(ar, b, a.new_tokens, a.prompt_len, a.repeats, device, temperature=1.0)
            ar_ms = 1000 * t_ar / a.new_tokens
            rows.append({"model": "ar (KV cache)", "batch": b, "steps": None, "guidance": None,
                         "ms_per_token": ar_ms, "tokens_per_s": b * a.new_tokens / t_ar, "ratio_vs_ar": 1.0})
            for steps, w in settings:
                t = time_sample(cola, b, a.new_tokens, a.prompt_len, a.repeats, device, steps=steps, guidance=w,
                                temperature=1.0)
                ms = 1000 * t / a.new_tokens
                rows.append({"model": f"cola (block {ccfg.model.dit.block_size}, KV cache)", "batch": b,
                             "steps": steps, "guidance": w, "ms_per_token": ms, "tokens_per_s": b * a.new_tokens / t,
                             "ratio_vs_ar": ms / ar_ms})
    head = f"{'model':<28} {'batch':>5} {'steps':>5} {'cfg':>4} {'ms/token':>9} {'tok/s':>9} {'cola/ar':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['model']:<28} {r['batch']:>5} {r['steps'] or '-':>5} {r['guidance'] or '-':>4} "
                     f"{r['ms_per_token']:>9.3f} {r['tokens_per_s']:>9.1f} {r['ratio_vs_ar']:>8.2f}")
    print("\n".join(lines))
    res = {"rows": rows, "new_tokens": a.new_tokens, "prompt_len": a.prompt_len, "repeats": a.repeats,
           "vocab": a.vocab, "threads": a.threads, "device": str(device),
           "cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
           "params": {"cola_total": cola_params, "cola_dit": sum(p.numel() for p in cola.dit.parameters()),
                      "cola_decoder": sum(p.numel() for p in cola.vae.decoder.parameters()),
                      "cola_encoder": sum(p.numel() for p in cola.vae.encoder.parameters()), "ar": ar_params},
           "cola_block_size": ccfg.model.dit.block_size, "vae_block_size": ccfg.model.vae.block_size,
           "note": "ms_per_token = median wall time of model.sample / new tokens (per sequence); "
                   "ratio_vs_ar = cola ms/token / ar ms/token at the same batch size, same run"}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
