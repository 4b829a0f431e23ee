"""Packed token sequences stored as WebDataset tar shards, plus random access into them.

Layout of a split directory:
    shard-000000.tar ...   members `%09d.input_ids.npy` (global sample index; int32[seq_len])
    manifest.json          counts, per-shard sha256/size, per-sample crc32, tokenizer and source hashes

The manifest is written last, after every shard is complete, so its presence means the
split is whole; readers trust nothing that is not listed in it. This module needs only
numpy (no torch), so the data tools start quickly.
"""
from __future__ import annotations

import bisect
import collections
import io
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from .corpus import Document, documents_sha256, sha256_file
from .tokenizer import Tokenizer

MANIFEST = "manifest.json"
FORMAT = "lflm_dist.shards/1"
FIELD = "input_ids.npy"
_REQUIRED = ("num_samples", "num_tokens", "seq_len", "shards", "tokenizer_sha256",
             "vocab_size", "eos_id", "source_sha256", "source")


class ShardError(RuntimeError):
    """A shard is missing, truncated or corrupt; the message names the file."""


def _remake_hint(split_dir: Path) -> str:
    return f"re-run data_tools/make_shards.py --out {split_dir}"


def shard_name(k: int) -> str:
    return f"shard-{k:06d}.tar"


# ----------------------------------------------------------------------------- writing
def pack_sequences(token_docs: Iterable[list[int]], seq_len: int, eos_id: int) -> Iterator[np.ndarray]:
    """Append EOS to each document, concatenate, and cut into int32[seq_len] rows.

    Streams: holds at most one document plus one row, whatever the corpus size.
    The final partial row is dropped.
    """
    eos = np.array([eos_id], dtype=np.int32)
    tail = np.empty(0, dtype=np.int32)
    for ids in token_docs:
        flat = np.concatenate([tail, np.asarray(ids, dtype=np.int32), eos])
        rows = len(flat) // seq_len
        yield from flat[: rows * seq_len].reshape(rows, seq_len)
        tail = flat[rows * seq_len:]


def _npy_bytes(row: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(row, dtype=np.int32), allow_pickle=False)
    return buf.getvalue()


def _tmp_path(out_dir: Path, name: str) -> Path:
    return out_dir / f".{name}.tmp"


def _write_tmp_shards(rows: Iterable[np.ndarray], out_dir: Path, seq_len: int,
                      samples_per_shard: int) -> list[dict]:
    """Write rows into `.shard-XXXXXX.tar.tmp` files; returns their manifest entries."""
    entries: list[dict] = []
    tf = None
    for index, row in enumerate(rows):
        if len(row) != seq_len:
            raise ValueError(f"sample {index} has length {len(row)}, expected seq_len={seq_len}")
        if index % samples_per_shard == 0:
            if tf is not None:
                tf.close()
            entries.append({"name": shard_name(len(entries)), "num_samples": 0})
            # USTAR with fixed mtime/owner: identical input gives byte-identical shards.
            tf = tarfile.open(_tmp_path(out_dir, entries[-1]["name"]), "w", format=tarfile.USTAR_FORMAT)
        data = _npy_bytes(row)
        info = tarfile.TarInfo(f"{index:09d}.{FIELD}")
        info.size, info.mtime, info.mode = len(data), 0, 0o444
        tf.addfile(info, io.BytesIO(data))
        entries[-1]["num_samples"] += 1
        entries[-1].setdefault("crc32", []).append(zlib.crc32(data))  # per sample: flipped bytes are caught
    if tf is not None:
        tf.close()
    for e in entries:
        tmp = _tmp_path(out_dir, e["name"])
        e["bytes"], e["sha256"] = tmp.stat().st_size, sha256_file(tmp)
    return entries


def _commit(out_dir: Path, entries: list[dict], manifest: dict) -> None:
    for e in entries:
        os.replace(_tmp_path(out_dir, e["name"]), out_dir / e["name"])
    tmp = out_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out_dir / MANIFEST)
    # Shards of an earlier, larger run (or leftovers of an interrupted one) are not in the
    # manifest; remove them so the directory holds exactly what the manifest describes.
    listed = {e["name"] for e in entries}
    for p in [*out_dir.glob("shard-*.tar"), *out_dir.glob(".shard-*.tar.tmp")]:
        if p.name not in listed:
            p.unlink()


def _write_split(rows: Iterable[np.ndarray], out_dir: str | os.PathLike, seq_len: int,
                 samples_per_shard: int, meta: Callable[[], dict]) -> dict:
    """Write rows as shards, then the manifest; `meta()` is called once the rows are
    exhausted, so it may report counts gathered while they were produced.

    The old manifest is removed first, so a run interrupted half-way leaves no manifest
    (loaders then say to re-run) rather than one that points at half-written shards.
    """
    if seq_len < 1 or samples_per_shard < 1:
        raise ValueError(f"seq_len ({seq_len}) and samples_per_shard ({samples_per_shard}) must be >= 1")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)
    entries = _write_tmp_shards(rows, out, seq_len, samples_per_shard)
    num_samples = sum(e["num_samples"] for e in entries)
    extra = meta()
    if num_samples == 0:
        raise ValueError(f"no complete sequence of seq_len={seq_len} tokens for {out} "
                         f"(source {extra.get('source', '?')}); use more text or a smaller --seq-len")
    manifest = {"format": FORMAT, "num_samples": num_samples, "num_tokens": num_samples * seq_len,
                "seq_len": seq_len, "dtype": "int32", "samples_per_shard": samples_per_shard,
                **extra, "shards": entries}
    _commit(out, entries, manifest)
    return manifest


def write_token_shards(rows: Iterable[np.ndarray], out_dir: str | os.PathLike, *, seq_len: int,
                       samples_per_shard: int = 1024, **meta) -> dict:
    """Write already-packed int rows as shards; `meta` (tokenizer_sha256, vocab_size, eos_id,
    source, source_sha256, ...) goes into the manifest as is."""
    return _write_split(rows, out_dir, seq_len, samples_per_shard, lambda: meta)


def write_shards(documents: list[Document], tokenizer: Tokenizer, out_dir: str | os.PathLike, *,
                 seq_len: int, samples_per_shard: int = 1024, source: str = "",
                 batch_docs: int = 64) -> dict:
    """Tokenize documents, pack them with EOS separators and write shards + manifest."""
    stream_tokens = 0

    def token_docs() -> Iterator[list[int]]:
        nonlocal stream_tokens
        for start in range(0, len(documents), batch_docs):
            for ids in tokenizer.encode_batch([t for _, t in documents[start:start + batch_docs]]):
                stream_tokens += len(ids) + 1  # + EOS
                yield ids

    def meta() -> dict:
        return {"tokenizer_sha256": tokenizer.sha256, "vocab_size": tokenizer.vocab_size,
                "eos_id": tokenizer.eos_id, "source": str(source),
                "source_sha256": documents_sha256(documents), "num_documents": len(documents),
                "num_tokens_dropped": stream_tokens % seq_len}

    rows = pack_sequences(token_docs(), seq_len, tokenizer.eos_id)
    return _write_split(rows, out_dir, seq_len, samples_per_shard, meta)


# ----------------------------------------------------------------------------- reading
def read_manifest(split_dir) -> dict:
    from .remote import is_remote
    if is_remote(split_dir):  # a RemoteDir: fetched (with retries), then checked like a local one
        return _check_manifest(json.loads(split_dir.read_bytes(MANIFEST)), split_dir.url(MANIFEST), split_dir)
    split_dir = Path(split_dir)
    path = split_dir / MANIFEST
    if not path.is_file():
        what = "directory does not exist" if not split_dir.is_dir() else f"no {MANIFEST} in it"
        raise FileNotFoundError(f"{path} not found ({what}); build the split with "
                                f"data_tools/make_shards.py --input TEXT --tokenizer TOKENIZER.json "
                                f"--out {split_dir} (an interrupted run also leaves no manifest)")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); {_remake_hint(split_dir)}") from None
    return _check_manifest(manifest, path, split_dir)


def _check_manifest(manifest: dict, path, split_dir) -> dict:
    missing = [k for k in _REQUIRED if k not in manifest]
    if missing:
        raise ValueError(f"{path} lacks {missing}; it is not a shard manifest of this format, "
                         f"{_remake_hint(split_dir)}")
    if sum(s["num_samples"] for s in manifest["shards"]) != manifest["num_samples"]:
        raise ValueError(f"{path}: shard sample counts do not add up to num_samples; {_remake_hint(split_dir)}")
    return manifest


def check_seq_len(manifest: dict, seq_len: int | None, split_dir: str | os.PathLike) -> None:
    have = manifest["seq_len"]
    if seq_len is not None and seq_len != have:
        raise ValueError(f"{split_dir} holds sequences of seq_len={have} but seq_len={seq_len} was "
                         f"requested; re-run data_tools/make_shards.py with --seq-len {seq_len} "
                         f"or set model.seq_len={have}")


def check_shard_files(split_dir: str | os.PathLike, manifest: dict, strict: bool = True) -> list[str]:
    """Cheap check (stat only) that every listed shard exists with its recorded size; raises on
    the first problem, or (strict=False: data.on_corrupt=skip) returns them all."""
    split_dir = Path(split_dir)
    problems = []
    for e in manifest["shards"]:
        path = split_dir / e["name"]
        if not path.is_file():
            problems.append(f"shard {path} listed in {split_dir / MANIFEST} is missing; {_remake_hint(split_dir)}")
        elif "bytes" in e and (size := path.stat().st_size) != e["bytes"]:
            problems.append(f"shard {path} has {size} bytes but the manifest records {e['bytes']}: "
                            f"it is truncated or corrupt; {_remake_hint(split_dir)}")
        if problems and strict:
            raise ShardError(problems[0])
    return problems


def check_tokenizer(manifest: dict, tokenizer: Tokenizer, split_dir: str | os.PathLike) -> None:
    """The split was written with this tokenizer (hash, vocabulary size, EOS id)."""
    for key, have in (("tokenizer_sha256", tokenizer.sha256), ("vocab_size", tokenizer.vocab_size),
                      ("eos_id", tokenizer.eos_id)):
        if manifest[key] != have:
            raise ShardError(f"{Path(split_dir) / MANIFEST} records {key}={str(manifest[key])[:16]} but the "
                             f"tokenizer in use has {str(have)[:16]}: the shards were written with another "
                             f"tokenizer; {_remake_hint(Path(split_dir))} with this one")


def verify_shards(split_dir: str | os.PathLike, manifest: dict) -> list[str]:
    """Full check (hashes every byte); returns one line per problem, empty if all good."""
    problems = []
    for e in manifest["shards"]:
        path = Path(split_dir) / e["name"]
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif (digest := sha256_file(path)) != e["sha256"]:
            problems.append(f"{path}: sha256 {digest[:16]}... != manifest {e['sha256'][:16]}...")
    return problems


def decode_sample(data: bytes, where: str, seq_len: int, crc: int | None = None,
                  vocab: int | None = None) -> np.ndarray:
    """One sample's int32[seq_len] row; `crc` (the manifest's crc32 of its bytes) and `vocab`
    (ids must lie in [0, vocab)) are checked when given."""
    if crc is not None and (got := zlib.crc32(data)) != crc:
        raise ShardError(f"{where}: checksum mismatch (crc32 {got:08x}, manifest {crc:08x}): its bytes changed "
                         "after make_shards.py wrote them; the shard is corrupt")
    try:
        row = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises several types for a damaged .npy
        raise ShardError(f"{where}: cannot decode {FIELD} ({e}); the shard is corrupt") from None
    if row.dtype != np.int32 or row.shape != (seq_len,):
        raise ShardError(f"{where}: expected int32[{seq_len}], found {row.dtype}{list(row.shape)}")
    if vocab is not None and (row.min() < 0 or row.max() >= vocab):
        raise ShardError(f"{where}: token ids {int(row.min())}..{int(row.max())} outside the vocabulary "
                         f"(0..{vocab - 1}); the shard is corrupt")
    return row


class ShardIndex:
    """Random access to sample i of a split: tar headers are scanned once per shard (on
    first use, or all at once with scan_all()), then each read is a single pread."""

    _MAX_OPEN = 32  # open files kept per process; bounded so thousands of shards stay under ulimit

    def __init__(self, split_dir: str | os.PathLike, manifest: dict | None = None):
        self.split_dir = Path(split_dir)
        self.manifest = manifest if manifest is not None else read_manifest(self.split_dir)
        self.seq_len: int = self.manifest["seq_len"]
        self.shards = self.manifest["shards"]
        counts = [s["num_samples"] for s in self.shards]
        self.starts = [0] + list(np.cumsum(counts)[:-1].tolist())
        self._members: dict[int, list[tuple[int, int]]] = {}
        self._bad: dict[int, str] = {}  # shards that failed scan_all(skip_bad=True): why
        self._fds: collections.OrderedDict[int, int] = collections.OrderedDict()

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def __getstate__(self):  # DataLoader workers may be spawned: file descriptors do not pickle
        state = self.__dict__.copy()
        state["_fds"] = collections.OrderedDict()
        return state

    def __del__(self):
        for fd in getattr(self, "_fds", {}).values():
            os.close(fd)

    def _path(self, k: int) -> Path:
        return self.split_dir / self.shards[k]["name"]

    def _scan(self, k: int) -> list[tuple[int, int]]:
        path, first, n = self._path(k), self.starts[k], self.shards[k]["num_samples"]
        try:
            with tarfile.open(path, "r:") as tf:
                members = [(m.name, m.offset_data, m.size) for m in tf if m.isfile()]
        except (tarfile.TarError, OSError, EOFError) as e:
            raise ShardError(f"shard {path} cannot be read as tar ({e}); it is corrupt or "
                             f"truncated, {_remake_hint(self.split_dir)}") from None
        expected = [f"{first + j:09d}.{FIELD}" for j in range(n)]
        size = path.stat().st_size
        if [m[0] for m in members] != expected or any(off + sz > size for _, off, sz in members):
            raise ShardError(f"shard {path} does not hold the {n} samples {expected[0]}..{expected[-1]} "
                             f"its manifest lists (found {len(members)} members): it is truncated, "
                             f"corrupt or from another run; {_remake_hint(self.split_dir)}")
        self._members[k] = [(off, sz) for _, off, sz in members]
        return self._members[k]

    def scan_all(self, skip_bad: bool = False) -> "ShardIndex":
        """Scan every shard now (once, in this process), e.g. before forking loader workers
        so they inherit the index instead of each scanning on its own. skip_bad: a shard that
        cannot be read is remembered (its samples then raise ShardError) instead of raising now."""
        for k in range(len(self.shards)):
            if k not in self._members and k not in self._bad:
                try:
                    self._scan(k)
                except ShardError as e:
                    if not skip_bad:
                        raise
                    self._bad[k] = str(e)
        return self

    def _fd(self, k: int) -> int:
        if k in self._fds:
            self._fds.move_to_end(k)
            return self._fds[k]
        if len(self._fds) >= self._MAX_OPEN:
            os.close(self._fds.popitem(last=False)[1])
        try:
            self._fds[k] = os.open(self._path(k), os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(f"shard {self._path(k)} is missing; {_remake_hint(self.split_dir)}") from None
        return self._fds[k]

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for {self.split_dir} ({len(self)} samples)")
        k = bisect.bisect_right(self.starts, i) - 1
        if k in self._bad:
            raise ShardError(self._bad[k])
        members = self._members[k] if k in self._members else self._scan(k)
        offset, size = members[i - self.starts[k]]
        # pread does not move a shared file offset, so forked workers can share descriptors.
        data = os.pread(self._fd(k), size, offset)
        if len(data) != size:
            raise ShardError(f"shard {self._path(k)} is truncated at sample {i}; {_remake_hint(self.split_dir)}")
        crcs = self.shards[k].get("crc32")  # shards written before per-sample checksums have none
        return decode_sample(data, f"shard {self._path(k)} sample {i}", self.seq_len,
                             crcs[i - self.starts[k]] if crcs else None, self.manifest["vocab_size"])
