"""Byte-level BPE tokenizer (HF `tokenizers`) with one special token, `<|endoftext|>`,
used as the EOS / document separator.

Byte-level means every string encodes without an unknown token and decodes back to
exactly the same string.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"
_MIN_VOCAB = 257  # 256 byte tokens + EOS


class Tokenizer:
    def __init__(self, hf: _HFTokenizer, source: str = "<memory>"):
        eos = hf.token_to_id(EOS)
        if eos is None:
            raise ValueError(f"tokenizer {source} has no {EOS} token; train one with "
                             f"data_tools/train_tokenizer.py or add it as a special token")
        # A literal "<|endoftext|>" inside user text stays text: only the packer may insert
        # document boundaries, and decode(encode(s)) == s holds for every string.
        hf.encode_special_tokens = True
        self._hf = hf
        # character-level tokenizers (`characters`): the characters they encode; None: byte-level
        self.alphabet: set[str] | None = None
        if hf.decoder is not None and type(hf.decoder).__name__ == "Fuse":
            self.alphabet = {c for c in hf.get_vocab() if c != EOS}
        self.eos_id: int = eos
        self.vocab_size: int = hf.get_vocab_size(with_added_tokens=True)
        # Hash of the canonical serialization (not the file bytes), so load(save(t)) keeps it.
        self.sha256: str = hashlib.sha256(hf.to_str().encode()).hexdigest()

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Tokenizer":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} not found; create it with "
                                    f"data_tools/train_tokenizer.py --out {path}")
        try:
            hf = _HFTokenizer.from_file(str(path))
        except Exception as e:  # the Rust error alone does not say which file
            raise ValueError(f"{path} is not a valid tokenizer.json ({e})") from None
        return cls(hf, source=str(path))

    @staticmethod
    def _byte_level(model: models.Model) -> _HFTokenizer:
        hf = _HFTokenizer(model)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        return hf

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 2048, min_frequency: int = 2) -> "Tokenizer":
        if vocab_size < _MIN_VOCAB:
            raise ValueError(f"vocab_size {vocab_size} is too small: a byte-level BPE needs at "
                             f"least {_MIN_VOCAB} (256 bytes + {EOS})")
        hf = cls._byte_level(models.BPE())
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
            # all 256 bytes up front, so bytes unseen in training still encode
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        hf.train_from_iterator(texts, trainer)
        return cls(hf, source="<trained>")

    @classmethod
    def characters(cls, texts: Iterable[str]) -> "Tokenizer":
        """One token per character (nanoGPT's shakespeare_char): <|endoftext|> is id 0, then the
        characters seen in `texts`, sorted. A BPE model without merges or pre-tokenizer splits a
        string into its characters; a character outside the vocabulary is an error at encode time
        (not byte-level: it has no fallback)."""
        chars = sorted(set().union(*(set(t) for t in texts)))
        vocab = {EOS: 0, **{c: i + 1 for i, c in enumerate(chars)}}
        hf = _HFTokenizer(models.BPE(vocab=vocab, merges=[]))
        hf.add_special_tokens([EOS])
        hf.decoder = decoders.Fuse()
        tok = cls(hf, source="<characters>")
        tok.alphabet = set(chars)
        return tok

    @classmethod
    def from_gpt2(cls, vocab_json: str | os.PathLike, merges_txt: str | os.PathLike) -> "Tokenizer":
        for p in (vocab_json, merges_txt):
            if not Path(p).is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file {p} not found")
        hf = cls._byte_level(models.BPE.from_file(str(vocab_json), str(merges_txt)))
        hf.add_special_tokens([EOS])  # already in vocab.json (50256); this marks it special
        return cls(hf, source=str(vocab_json))

    def save(self, path: str | os.PathLike) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self._hf.to_str(pretty=True), encoding="utf-8")
        os.replace(tmp, path)

    # ------------------------------------------------------------------ use
    def encode(self, text: str) -> list[int]:
        return self._checked(text, self._hf.encode(text, add_special_tokens=False).ids)

    def _checked(self, text: str, ids: list[int]) -> list[int]:
        if self.alphabet is not None and len(ids) != len(text):  # a BPE without unk drops unknown characters
            unknown = sorted(set(text) - self.alphabet)
            raise ValueError(f"characters {unknown[:10]} are not in this character-level tokenizer's vocabulary")
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Like encode, but the Rust side runs the texts in parallel."""
        return [self._checked(t, e.ids) for t, e in zip(texts, self._hf.encode_batch(texts, add_special_tokens=False))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=False)  # accepts numpy/torch ids

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos_id={self.eos_id}, sha256={self.sha256[:12]})"
