"""The held-out metric every sweep run ends with: bits per character of one fixed validation text.

Families differ in objective and may differ in tokenizer, so neither training losses nor
per-token NLLs are comparable across them. Characters are: the sweep writes the validation text
once as plain text files (`eval_text/` in the sweep dir), every run re-tokenizes it with its own
tokenizer and scores it with the evaluation harness's likelihood (the function
launchers/evaluate.py uses): exact NLL for autoregressive models, an upper bound (-ELBO) for
latent-variable ones; BPC = total nats / characters / ln 2.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from lflm_dist.eval.likelihood import BoundSettings, evaluate_likelihood, load_eval_text

TEXT_DIR = "eval_text"


def write_eval_text(source: str | Path, out_dir: str | Path, max_chars: int) -> dict:
    """Write the first `max_chars` characters of `source` as one .txt file per document under
    out_dir/eval_text/ and return its description (also eval_text.json). `source` is a text file or
    directory, or a shard split dir (manifest.json), decoded with its data dir's tokenizer: decoding
    once here, rather than in each run, keeps the text the same whatever tokenizer a run uses."""
    out = Path(out_dir) / TEXT_DIR
    meta_path = Path(out_dir) / "eval_text.json"
    want = {"source": str(source), "max_chars": max_chars}
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if {k: meta[k] for k in want} != want:
            raise ValueError(f"{out_dir} was evaluated on {meta['source']} (max_chars {meta['max_chars']}), this "
                             f"sweep asks for {source} (max_chars {max_chars}): use another sweep.dir")
        return meta
    docs = _documents(Path(source))
    kept, chars = [], 0
    for text in docs:
        text = text[:max_chars - chars]
        if text:
            kept.append(text)
            chars += len(text)
        if chars >= max_chars:
            break
    if not kept:
        raise ValueError(f"{source}: no validation text")
    out.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    for i, text in enumerate(kept):
        (out / f"doc{i:05d}.txt").write_text(text, encoding="utf-8")
        h.update(text.encode())
    meta = {**want, "chars": chars, "documents": len(kept), "sha256": h.hexdigest(), "dir": str(out)}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    return meta


def _documents(source: Path) -> list[str]:
    if (source / "manifest.json").is_file():
        from lflm_dist.data.shards import ShardIndex, read_manifest
        from lflm_dist.data.tokenizer import Tokenizer
        tok = Tokenizer.load(source.parent / "tokenizer.json")
        index = ShardIndex(source, read_manifest(source))
        ids = [int(x) for i in range(len(index)) for x in index[i]]
        docs, cur = [], []
        for x in ids:  # documents are packed end to end, each followed by EOS
            if x == tok.eos_id:
                docs.append(cur)
                cur = []
            else:
                cur.append(x)
        docs.append(cur)
        return [tok.decode(d) for d in docs if d]
    from lflm_dist.data.corpus import read_documents
    return [text for _, text in read_documents(source)]


def heldout_bpc(run_dir: str | Path, text_dir: str | Path, settings: BoundSettings, batch_size: int) -> dict:
    """evaluate_likelihood of the run's last checkpoint on the sweep's text (all of it)."""
    import torch
    from lflm_dist.generate import load_run

    torch.manual_seed(settings.seed)
    model, cfg, tok = load_run(run_dir, "cuda" if torch.cuda.is_available() else "cpu")
    data = load_eval_text(text_dir, tok)
    r = evaluate_likelihood(model, cfg, tok, data, settings=settings, batch_size=batch_size)
    return {k: r[k] for k in ("bpc", "nll_per_token", "ppl", "kind", "is_upper_bound", "tokens", "chars",
                              "stderr_nll_per_token", "terms_per_token", "seconds")}
