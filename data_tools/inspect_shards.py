#!/usr/bin/env python
"""Summarise a shard split, verify every shard's sha256, and decode a few samples.

Exit status 1 if a shard is missing or its hash differs from the manifest.

Example:
    python data_tools/inspect_shards.py data/shakespeare/train -n 3
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from lflm_dist.data.shards import ShardIndex, read_manifest, verify_shards
from lflm_dist.data.tokenizer import Tokenizer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("split_dir", help="directory holding manifest.json and shard-*.tar")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json to decode with (default: SPLIT_DIR/../tokenizer.json if present)")
    ap.add_argument("-n", type=int, default=3, help="samples to show (default 3)")
    args = ap.parse_args(argv)

    split = Path(args.split_dir)
    m = read_manifest(split)
    print(f"{split}: {m['num_samples']:,} samples x seq_len {m['seq_len']} = {m['num_tokens']:,} tokens "
          f"in {len(m['shards'])} shard(s)")
    print(f"  vocab_size={m['vocab_size']} eos_id={m['eos_id']} tokenizer_sha256={m['tokenizer_sha256'][:16]}...")
    print(f"  source={m['source']} source_sha256={m['source_sha256'][:16]}...")

    problems = verify_shards(split, m)
    print("  shards: " + ("all sha256 OK" if not problems else f"{len(problems)} problem(s)"))
    for p in problems:
        print(f"    {p}")

    tok_path = Path(args.tokenizer) if args.tokenizer else split.parent / "tokenizer.json"
    tok = Tokenizer.load(tok_path) if args.tokenizer or tok_path.is_file() else None
    if tok is not None and tok.sha256 != m["tokenizer_sha256"]:
        print(f"  WARNING: {tok_path} is not the tokenizer these shards were made with (sha256 differs)")
    if not problems:
        index = ShardIndex(split, m)
        for i in range(min(args.n, len(index))):
            ids = index[i]
            print(f"--- sample {i}: {ids[:12].tolist()}{' ...' if len(ids) > 12 else ''}")
            if tok is not None:
                print(tok.decode(ids))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
