"""Sampling metrics: conditional generation scored with BLEU (sacrebleu) and ROUGE-L
(rouge-score), unigram sample entropy, and generative perplexity of samples under a
reference causal LM (transformers, loaded offline; e.g. SmolLM2-135M GGUF).

Generative perplexity depends on the evaluator LM, the sampler's precision and steps: it is
always reported with the sampler settings and the sample entropy (a degenerate sampler that
repeats one token gets a low generative perplexity and a low entropy)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path

import torch

from lflm_dist.config import SampleConfig


def read_pairs(path: str | Path) -> list[dict]:
    """jsonl lines of {"source": ..., "reference": ...}."""
    rows = []
    for i, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        if "source" not in row or "reference" not in row:
            raise ValueError(f"{path}:{i + 1}: each line needs 'source' and 'reference'")
        rows.append(row)
    return rows


def bleu_rouge(hypotheses: list[str], references: list[str]) -> dict:
    """Corpus BLEU (sacrebleu, 13a tokenisation, 0-100) and mean ROUGE-L F1 (rouge-score, 0-1)."""
    import sacrebleu
    from rouge_score import rouge_scorer
    bleu = sacrebleu.corpus_bleu(hypotheses, [references])
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rl = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"bleu": bleu.score, "bleu_signature": str(bleu.format(signature=True)) if hasattr(bleu, "format") else "",
            "rougeL_f": sum(rl) / max(1, len(rl))}


def sample_entropy(token_lists: list[list[int]]) -> float:
    """Unigram entropy (nats) of the tokens of all samples pooled."""
    counts = Counter(t for toks in token_lists for t in toks)
    n = sum(counts.values())
    return -sum(c / n * math.log(c / n) for c in counts.values()) if n else 0.0


def _sample(model, tok, prompts: list[str], s: SampleConfig, seed: int, batch_size: int = 16) -> list[list[int]]:
    device = next(model.parameters()).device
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for i in range(0, len(prompts), batch_size):
        ids = [tok.encode(p) for p in prompts[i:i + batch_size]]
        out += model.sample(ids, s.max_new_tokens, **s.sampler_kwargs(), pad_id=tok.eos_id, generator=g)
    return out


def _sampler(s: SampleConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(s).items() if k not in ("num_samples", "prompt")}


def _cut(text: str, stops: tuple[str, ...]) -> str:
    for st in stops:
        j = text.find(st)
        if j >= 0:
            text = text[:j]
    return text


def conditional_generation(model, tok, pairs: list[dict], s: SampleConfig, seed: int = 0,
                           stop: tuple[str, ...] = ("<|endoftext|>", "\n")) -> dict:
    """Continue each `source` and score the continuation against its `reference`."""
    ids = _sample(model, tok, [p["source"] for p in pairs], s, seed)
    hyps = [_cut(tok.decode(x), stop).strip() for x in ids]
    refs = [p["reference"] for p in pairs]
    return {**bleu_rouge(hyps, refs), "sample_entropy": sample_entropy(ids), "num_pairs": len(pairs),
            "sampler": _sampler(s), "seed": seed, "hypotheses": hyps, "references": refs,
            "samples": [tok.decode(x) for x in ids]}


def unconditional_samples(model, tok, n: int, s: SampleConfig, prompt: str = "", seed: int = 0) -> dict:
    ids = _sample(model, tok, [prompt] * n, s, seed)
    return {"num_samples": n, "sample_entropy": sample_entropy(ids), "sampler": _sampler(s), "seed": seed,
            "prompt": prompt, "samples": [tok.decode(x) for x in ids]}


def load_reference_lm(model_dir: str | Path, gguf_file: str | None = None, device: str = "cpu"):
    """(model, tokenizer) of a causal LM from a local dir, never touching the hub
    (gguf_file: a GGUF inside model_dir, dequantised by transformers)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    kw = {"gguf_file": gguf_file} if gguf_file else {}
    tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True, **kw)
    lm = AutoModelForCausalLM.from_pretrained(str(model_dir), local_files_only=True, torch_dtype=torch.float32, **kw)
    return lm.to(device).eval(), tok


@torch.no_grad()
def generative_perplexity(texts: list[str], model_dir: str | Path | None = None, gguf_file: str | None = None, *,
                          lm=None, lm_tok=None, device: str = "cpu", max_len: int = 512) -> dict:
    """exp(total NLL / total tokens) of `texts` under a reference LM (each text after its BOS/EOS),
    with the evaluator named, so the number is never reported without what produced it."""
    if lm is None:
        lm, lm_tok = load_reference_lm(model_dir, gguf_file, device)
    bos = lm_tok.bos_token_id if lm_tok.bos_token_id is not None else lm_tok.eos_token_id
    total, n = 0.0, 0
    for t in texts:
        ids = [bos] + lm_tok(t, add_special_tokens=False)["input_ids"][:max_len - 1]
        if len(ids) < 2:
            continue
        x = torch.tensor([ids], device=next(lm.parameters()).device)
        logits = lm(x).logits[0, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="sum"))
        n += len(ids) - 1
    return {"gen_ppl": math.exp(total / n) if n else float("nan"), "tokens": n,
            "evaluator": f"{model_dir}{'/' + gguf_file if gguf_file else ''}" if model_dir else type(lm).__name__}
