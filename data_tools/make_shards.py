#!/usr/bin/env python
r"""Tokenize text and pack it into fixed-length sequences stored as WebDataset tar shards.

Each document gets <|endoftext|> appended; the token stream is cut into rows of exactly
--seq-len tokens (the tail is dropped) and written as SPLIT_DIR/shard-%06d.tar with
SPLIT_DIR/manifest.json. The manifest is written last, so an interrupted run leaves none.

Example:
    python data_tools/make_shards.py --input data/corpus/shakespeare/train \
        --tokenizer data/shakespeare/tokenizer.json --out data/shakespeare/train --seq-len 64
"""
from __future__ import annotations

import argparse
import sys
import time

from lflm_dist.data.corpus import read_documents
from lflm_dist.data.shards import write_shards
from lflm_dist.data.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="text file, .gz file or directory of .txt/.gz/.tokens files")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json (from train_tokenizer.py)")
    ap.add_argument("--out", required=True, help="split directory to write (e.g. data/shakespeare/train)")
    ap.add_argument("--seq-len", type=int, required=True, help="tokens per sequence; must equal model.seq_len")
    ap.add_argument("--samples-per-shard", type=int, default=1024, help="sequences per tar shard (default 1024)")
    args = ap.parse_args(argv)

    t0 = time.time()
    tok = Tokenizer.load(args.tokenizer)
    docs = read_documents(args.input)
    m = write_shards(docs, tok, args.out, seq_len=args.seq_len,
                     samples_per_shard=args.samples_per_shard, source=args.input)
    print(f"wrote {args.out}: {m['num_samples']:,} sequences x {m['seq_len']} = {m['num_tokens']:,} tokens "
          f"in {len(m['shards'])} shard(s) from {m['num_documents']} document(s) "
          f"({m['num_tokens_dropped']} tail tokens dropped) in {time.time() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
