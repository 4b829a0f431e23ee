#!/usr/bin/env python
r"""Train a byte-level BPE tokenizer (special token <|endoftext|>), or convert GPT-2's.

Examples:
    python data_tools/train_tokenizer.py --input data/corpus/shakespeare/train \
        --out data/shakespeare/tokenizer.json --vocab-size 2048
    python data_tools/train_tokenizer.py --gpt2-vocab vocab.json --gpt2-merges merges.txt \
        --out data/gpt2/tokenizer.json
    python data_tools/train_tokenizer.py --input input.txt --out data/char/tokenizer.json --characters

Train on the training split only, so validation text does not shape the vocabulary.
"""
from __future__ import annotations

import argparse
import sys

from lflm_dist.data.corpus import read_documents
from lflm_dist.data.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", help="text file, .gz file or directory of .txt/.gz/.tokens files to train on")
    src.add_argument("--gpt2-vocab", help="GPT-2 vocab.json (use with --gpt2-merges instead of --input)")
    ap.add_argument("--gpt2-merges", help="GPT-2 merges.txt")
    ap.add_argument("--out", required=True, help="tokenizer.json to write")
    ap.add_argument("--characters", action="store_true",
                    help="one token per character of the --input text (nanoGPT's shakespeare_char) instead of BPE")
    ap.add_argument("--vocab-size", type=int, default=2048, help="vocabulary size incl. <|endoftext|> (default 2048)")
    args = ap.parse_args(argv)

    if args.gpt2_vocab:
        if not args.gpt2_merges:
            ap.error("--gpt2-vocab needs --gpt2-merges")
        tok = Tokenizer.from_gpt2(args.gpt2_vocab, args.gpt2_merges)
    else:
        if args.gpt2_merges:
            ap.error("--gpt2-merges needs --gpt2-vocab (not --input)")
        docs = read_documents(args.input)
        texts = [text for _, text in docs]
        tok = Tokenizer.characters(texts) if args.characters else Tokenizer.train(texts, vocab_size=args.vocab_size)
    tok.save(args.out)
    print(f"wrote {args.out}: vocab_size={tok.vocab_size} eos_id={tok.eos_id} sha256={tok.sha256}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
