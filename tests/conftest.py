"""Shared fixtures. `tiny_data` is a prepared data dir (tokenizer.json, train/, valid/ with
seq_len 32 shards), built once per session the same way the data tools build one."""
import importlib.util
from pathlib import Path

import pytest

from lflm_dist.data import Tokenizer, split_documents, write_shards

ROOT = Path(__file__).resolve().parents[1]
TINY_SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"


def load_script(relpath: str, name: str | None = None):
    """Import a script of the repo (data_tools/, launchers/, bench/) as a module, to call its functions."""
    spec = importlib.util.spec_from_file_location(name or Path(relpath).stem, ROOT / relpath)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def tiny_documents(chars: int = 200_000) -> list[tuple[str, str]]:
    """~20 documents of Shakespeare (or generated text where shared data is absent)."""
    if TINY_SHAKESPEARE.is_file():
        text = TINY_SHAKESPEARE.read_text(encoding="utf-8")[:chars]
    else:
        text = "".join(f"Line {i}: to be, or not to be; that is the question {i * 7}.\n\n" for i in range(chars // 60))
    parts = text.split("\n\n")
    k = max(1, len(parts) // 20)
    return [(f"doc{j:02d}.txt", "\n\n".join(parts[i:i + k])) for j, i in enumerate(range(0, len(parts), k))]


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_data")
    train, valid = split_documents(tiny_documents(), valid_fraction=0.1, seed=0)
    tok = Tokenizer.train([t for _, t in train], vocab_size=384)
    tok.save(root / "tokenizer.json")
    for split, docs in (("train", train), ("valid", valid)):
        write_shards(docs, tok, root / split, seq_len=32, samples_per_shard=256, source=f"tinyshakespeare/{split}")
    return root
