#!/usr/bin/env python
"""Latent Flow Transformer tools: choose the block to replace, and judge a trained flow layer.

    # recoupling ratio of candidate blocks (lower: the teacher's pairing is closer to the OT one)
    python launchers/lft.py recoupling --teacher data/smollm2-135m --text FILE --blocks 12:19,12:24,4:11
    # every block of 12 layers, with the KL of skipping it (what the flow layer must restore)
    python launchers/lft.py recoupling --teacher data/smollm2-135m --text FILE --every 12 --skip-kl

    # skip baselines: KL(teacher || teacher without layers [start, start+s)) for each s
    python launchers/lft.py skips --teacher data/smollm2-135m --text FILE --start 12 --skips 1,2,3,4

    # a trained run: KL, NMSE and perplexity for k solver steps, beside the skip baselines of its block
    python launchers/lft.py compare --run runs/lft_fm_12_19_4k --text FILE --steps 1,2,3,5 --out res.json

Text: --max-chars characters of FILE (.gz read as text) from character --from-char (default: the first
400,000; a later stretch scores text a run trained on, e.g. --from-char 500000), tokenized with the teacher's own
tokenizer without special tokens, cut into the first --windows consecutive windows of --window
tokens. KL is averaged over every position, perplexity is exp(total NLL / tokens).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lflm_dist.eval import lft_metrics as M  # noqa: E402


def load_teacher(path: str):
    """The teacher and its own tokenizer (tokenizer.json in its dir, as data_tools/make_shards.py uses)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from lflm_dist.data.tokenizer import Tokenizer
    lm = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32,
                                              attn_implementation="sdpa")
    return lm.eval().requires_grad_(False), Tokenizer.load(Path(path) / "tokenizer.json")


def windows_of(tok, a) -> torch.Tensor:
    """No special tokens (Tokenizer.encode adds none), as the skip-baseline protocol."""
    return M.token_windows(tok.encode(M.read_text(a.text, a.max_chars, a.from_char)), a.window, a.windows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name in ("recoupling", "skips", "compare"):
        s = sub.add_parser(name, help=name)
        if name == "compare":
            s.add_argument("--run", required=True, help="an LFT run dir or checkpoint")
            s.add_argument("--steps", default="1,2,3,5", help="solver steps of the student to evaluate")
            s.add_argument("--solver", default=None, help="euler | midpoint (default: the run's model.lft.solver)")
            s.add_argument("--skips", default="", help="skip baselines from the block's start (default 1..n-m)")
            s.add_argument("--plot", type=Path, default=None, help="KL against layers removed, as a PNG")
        else:
            s.add_argument("--teacher", required=True, help="Hugging Face model dir")
        if name == "recoupling":
            which = s.add_mutually_exclusive_group(required=True)
            which.add_argument("--blocks", help="candidate blocks m:n, comma-separated")
            which.add_argument("--every", type=int, metavar="L", help="every block of L consecutive layers")
            s.add_argument("--states", type=int, default=256, help="token states in the OT matching")
            s.add_argument("--skip-kl", action="store_true",
                           help="also KL(teacher || teacher without the block) on the windows (one forward a block)")
        if name == "skips":
            s.add_argument("--start", type=int, required=True)
            s.add_argument("--skips", default="1,2,3,4")
        s.add_argument("--text", required=True, help="text file (.gz ok)")
        s.add_argument("--max-chars", type=int, default=400_000)
        s.add_argument("--from-char", type=int, default=0, help="start the text here (default: its beginning)")
        s.add_argument("--windows", type=int, default=12)
        s.add_argument("--window", type=int, default=256)
        s.add_argument("--batch", type=int, default=4)
        s.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    a = p.parse_args(argv)
    if a.from_char < 0:  # a negative start would silently score the file's tail
        p.error(f"--from-char {a.from_char}: must be >= 0 (a character offset from the file's start)")
    torch.manual_seed(0)
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731

    if a.cmd == "compare":
        from lflm_dist.generate import load_run
        model, cfg, tok = load_run(a.run)  # the run's tokenizer is the teacher's (data sharded with it)
        if not hasattr(model, "student"):
            raise SystemExit(f"{a.run}: model.family={cfg.model.family}, not a Latent Flow Transformer run")
        lm = model.teacher
    else:
        lm, tok = load_teacher(a.teacher)
    win = windows_of(tok, a)
    info = {"text": str(a.text), "max_chars": a.max_chars, "from_char": a.from_char, "windows": len(win), "window": a.window}
    if a.cmd == "recoupling":
        n_layers = len(M.layer_list(lm))
        if a.every is not None and not 1 <= a.every <= n_layers:
            raise SystemExit(f"--every {a.every}: the teacher has {n_layers} layers")
        blocks = ([(m, m + a.every) for m in range(n_layers - a.every + 1)] if a.every is not None
                  else [tuple(int(x) for x in b.split(":")) for b in a.blocks.split(",")])
        rows = M.recoupling_table(lm, win, blocks, a.states, skip_kl=a.skip_kl, batch=a.batch)
        print(M.format_table(rows, ["block", "layers", "recoupling", "update_over_state"]
                             + ["skip_kl"] * a.skip_kl))
    else:
        tlp = M._log_probs(lm, win, a.batch)
        teacher = {"model": "teacher", "layers_removed": 0, **M.kl_and_ppl(tlp, tlp, win)}
        if a.cmd == "skips":
            rows = [teacher] + M.skip_baselines(lm, win, a.start, ints(a.skips), a.batch, tlp)
        else:
            skips = ints(a.skips) or list(range(1, model.n - model.m + 1))
            rows = ([teacher] + M.skip_baselines(lm, win, model.m, skips, a.batch, tlp)
                    + M.student_rows(model, win, ints(a.steps), a.batch, tlp, a.solver))
            if a.plot:
                M.plot_kl([r for r in rows if r["model"].startswith("skip")],
                          [(r["model"], "*", r) for r in rows if r["model"].startswith("flow")], a.plot)
        print(M.format_table(rows, ["model", "layers_removed", "kl", "nmse", "update_nmse", "ppl"]))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({**info, "command": " ".join(sys.argv), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
