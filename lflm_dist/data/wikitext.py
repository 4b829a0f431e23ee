"""Wikipedia text in WikiText-2's layout (its `.tokens` files'): the articles of a WikiExtractor
output or of a MediaWiki XML dump, words tokenized as WikiText's are, rare words as "<unk>", and
articles that overlap a given text dropped. `data_tools/fetch_wiki_text.py` runs it on Wikipedia
text that package registries serve."""
from __future__ import annotations

import html
import re
from collections import Counter

UNK = "<unk>"
NGRAM = 13  # GPT-3's contamination test: any shared 13-word sequence
LAYOUT = 1  # the conversion's version: a data tool records it, so a changed conversion rewrites its output

# inside a word or number: marked first (\0-\2 stand in), so the punctuation split leaves them whole
_WORD_JOINERS = ((re.compile(r"(?<=\w)-(?=\w)"), " \0 ", "@-@"), (re.compile(r"(?<=\d),(?=\d)"), " \1 ", "@,@"),
                 (re.compile(r"(?<=\d)\.(?=\d)"), " \2 ", "@.@"))
_PUNCT = re.compile(r'([,;:!?()\[\]"“”–—%$])')
_SENTENCE_END = re.compile(r"(?<=[^\s.])\.(?=\s|$)")  # a word's final "." (not "U.S" inside, not "...")
_CLITIC = re.compile(r"(?i)(\w)('s|'re|'ve|'ll|'d|'m|n't)\b")


def wikitext_words(line: str) -> str:
    """One line tokenized as WikiText's are (Moses-like): `game's` -> `game 's`, `role-playing` ->
    `role @-@ playing`, `1,000.5` -> `1 @,@ 000 @.@ 5`, punctuation split off; the "." of an
    initial or an abbreviation stays ("J. C. W.", "U.S.")."""
    for pattern, mark, _ in _WORD_JOINERS:
        line = pattern.sub(mark, line)
    line = _PUNCT.sub(r" \1 ", line.replace("’", "'"))
    line = _CLITIC.sub(r"\1 \2", line)
    line = re.sub(r"(?<=\w)'(?=\s|$)", " '", line)  # plural possessive: players' -> players '
    line = _SENTENCE_END.sub(lambda m: m.group(0) if _is_initial(line, m.start()) else " .", line)
    for _, mark, joiner in _WORD_JOINERS:
        line = line.replace(mark.strip(), joiner)
    return " ".join(line.split())


def _is_initial(line: str, dot: int) -> bool:
    word = line[:dot].rsplit(None, 1)[-1] if line[:dot].strip() else ""
    return (len(word) == 1 and word.isupper()) or "." in word  # "J." of "J. C. W.", "U.S."


def heading(level: int, title: str) -> str:
    """WikiText's heading line for a section of `level` (1: the article's title): "= = Section = =" """
    return " ".join(["="] * level + [wikitext_words(title)] + ["="] * level)


# ----------------------------------------------------------------------------- WikiExtractor output
_DOC = re.compile(r'<doc [^>]*title="([^"]*)">\n(.*?)</doc>', re.S)


def is_extractor_heading(line: str) -> bool:
    """WikiExtractor keeps a section title as its own line with a "." added: short, one sentence."""
    return line.endswith(".") and len(line.split()) <= 8 and line.count(".") == 1 and line[:1].isupper()


def extractor_articles(wiki_utf8: str) -> list[tuple[str, list[str]]]:
    """(title, [title heading, section headings and paragraphs, tokenized]) per <doc> of WikiExtractor's
    output; stubs (no text) left out."""
    out = []
    for title, body in _DOC.findall(wiki_utf8):
        lines = [ln.strip() for ln in body.split("\n") if ln.strip()]
        if lines and lines[0] == title.strip():
            lines = lines[1:]  # WikiExtractor repeats the title as the body's first line
        if lines:
            out.append((title, [heading(1, title)] + [heading(2, ln[:-1]) if is_extractor_heading(ln)
                                                      else wikitext_words(ln) for ln in lines]))
    return out


# ----------------------------------------------------------------------------- MediaWiki XML dump
_PAGE = re.compile(r"<page>.*?<title>(.*?)</title>.*?<ns>(\d+)</ns>.*?<text[^>]*>(.*?)</text>.*?</page>", re.S)
# sections that list sources and links rather than prose
_NO_PROSE = {"references", "external links", "see also", "further reading", "notes", "bibliography", "sources",
             "footnotes", "citations", "notes and references", "references and notes", "gallery", "works cited"}
_DROP_ELEMENTS = re.compile(r"<!--.*?-->|<(ref|math|gallery|timeline|score|syntaxhighlight|source|chem)\b[^>]*?"
                            r"(/>|>.*?</\1\s*>)", re.S | re.I)
_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE = re.compile(r"\{\|(?:(?!\{\|).)*?\|\}", re.S)
_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_NON_TEXT_LINK = re.compile(r"(?i)^\s*(file|image|category|media|wikipedia|wp|help|portal|[a-z]{2,3}(-[a-z]+)?)\s*:")
_MARKUP = re.compile(r"\[(?:https?:)?//\S+\]|<[^>\n]*>|'{2,}|__[A-Z]+__")  # bare links, tags, bold/italic, magic words
_HEADING = re.compile(r"(={2,6})\s*(.*?)\s*\1")


def _link_text(m: re.Match) -> str:
    """[[target|shown]] -> shown, [[target]] -> target; files, categories and interwiki links -> ''."""
    inner = m.group(1)
    return "" if _NON_TEXT_LINK.match(inner) else inner.split("|")[-1]


def _innermost_first(pattern: re.Pattern, repl, text: str) -> str:
    while True:  # nested markup: the innermost first, until none is left
        text, n = pattern.subn(repl, text)
        if not n:
            return text


def plain_sections(markup: str) -> list[tuple[int, str]]:
    """MediaWiki markup -> [(heading level, title) or (0, paragraph)] in plain text: templates,
    tables, references, files, categories and list lines dropped, links reduced to their text,
    sections that list references and links left out, as are headings without prose under them."""
    text = html.unescape(html.unescape(markup))  # the dump's XML escaping, then the markup's own entities
    text = _DROP_ELEMENTS.sub("", text)
    for pattern, repl in ((_TEMPLATE, ""), (_TABLE, ""), (_LINK, _link_text)):
        text = _innermost_first(pattern, repl, text)
    text = re.sub(r"\[(?:https?:)?//\S+\s+([^\]]*)\]", r"\1", text)  # [http://x shown] -> shown
    text = _MARKUP.sub("", text)
    out, skip_level = [], 0
    for ln in (ln.strip() for ln in text.split("\n")):
        head = _HEADING.fullmatch(ln)
        if head:
            level = len(head.group(1))
            if skip_level and level > skip_level:
                continue  # a subsection of a skipped section
            skip_level = level if head.group(2).lower() in _NO_PROSE else 0
            if not skip_level and head.group(2):
                out.append((level, head.group(2)))
        elif not skip_level and ln and ln[0] not in "*#:;|!{}=" and len(ln.split()) >= 4:
            out.append((0, ln))
    return [(lvl, s) for i, (lvl, s) in enumerate(out)  # keep a heading only if prose follows before its peer
            if lvl == 0 or any(l2 == 0 for l2, _ in _until_peer(out, i))]


def _until_peer(items: list[tuple[int, str]], i: int) -> list[tuple[int, str]]:
    rest = []
    for lvl, s in items[i + 1:]:
        if 0 < lvl <= items[i][0]:
            break
        rest.append((lvl, s))
    return rest


def mediawiki_articles(dump_xml: str) -> list[tuple[str, list[str]]]:
    """(title, layout lines) per article page (namespace 0, not a redirect) of a MediaWiki XML dump;
    a level-n heading becomes WikiText's n-fold "= ... =" line."""
    out = []
    for title, ns, markup in _PAGE.findall(dump_xml):
        if ns != "0" or markup.lstrip().upper().startswith("#REDIRECT"):
            continue
        title = html.unescape(title)
        lines = [heading(lvl, s) if lvl else wikitext_words(s) for lvl, s in plain_sections(markup)]
        if lines:
            out.append((title, [heading(1, title)] + lines))
    return out


# ----------------------------------------------------------------------------- contamination, <unk>, layout
def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    words = [w for w in text.lower().split() if w != UNK]
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def with_unks(lines: list[str], vocab: set[str]) -> list[str]:
    return [" ".join(w if w in vocab or w == "=" else UNK for w in ln.split()) for ln in lines]


def wikitext_layout(docs: list[list[str]]) -> str:
    """WikiText's file layout: every line starts with a space; headings have a blank line either side,
    a section's paragraphs follow one another."""
    return "".join(f" \n {ln} \n \n" if ln.startswith("= ") else f" {ln} \n" for doc in docs for ln in doc)


def convert(docs: list[tuple[str, list[str]]], exclude: list[str], vocab_from: list[str],
            min_count: int) -> tuple[str, dict]:
    """The articles as one WikiText-layout text, and a summary (counts, dropped titles): an article
    sharing a 13-word sequence with an `exclude` text is dropped ("<unk>" left out of both); words
    neither in `vocab_from` nor seen `min_count` times in the kept articles become "<unk>"."""
    banned = set().union(*(ngrams(t) for t in exclude)) if exclude else set()
    kept, dropped = [], []
    for title, lines in docs:
        (dropped if banned and ngrams(" ".join(lines)) & banned else kept).append((title, lines))
    counts = Counter(w for _, lines in kept for ln in lines for w in ln.split())
    vocab = {w for w, c in counts.items() if c >= min_count}
    vocab |= {w for t in vocab_from for w in t.split()}
    text = wikitext_layout([with_unks(lines, vocab) for _, lines in kept])
    words = text.split()
    return text, {"articles": len(kept), "dropped_articles": len(dropped), "dropped_titles": [t for t, _ in dropped],
                  "words": len(words), "unk_fraction": round(words.count(UNK) / max(len(words), 1), 4),
                  "chars": len(text)}
