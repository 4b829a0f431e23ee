"""Data pipeline: text corpora -> byte-level BPE tokens -> packed WebDataset shards ->
per-rank training batches.

    corpus     read_documents, split_documents, fetch_shakespeare
    tokenizer  Tokenizer (byte-level BPE, <|endoftext|> as EOS)
    shards     write_shards, read_manifest, ShardIndex (numpy only)
    loader     TokenBatches, eval_batches (torch)

The loader names are imported lazily so that the data tools, which never batch, start
without importing torch.
"""
from .corpus import fetch_shakespeare, read_documents, split_documents
from .shards import ShardError, ShardIndex, read_manifest, write_shards, write_token_shards
from .tokenizer import Tokenizer

_LAZY = {"TokenBatches", "eval_batches"}

__all__ = ["fetch_shakespeare", "read_documents", "split_documents", "Tokenizer", "ShardError",
           "ShardIndex", "read_manifest", "write_shards", "write_token_shards", *sorted(_LAZY)]


def __getattr__(name: str):
    if name in _LAZY:
        from . import loader
        return getattr(loader, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
