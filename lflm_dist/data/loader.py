"""Training and evaluation batches from a shard split, per data-parallel rank.

Two modes for training (`TokenBatches`):

* ``indexed`` (default): random access by global sample index. Epoch e is a global
  permutation seeded by (seed, e); global step s takes perm[s*G:(s+1)*G] and rank r its
  contiguous slice of b = G // world_size rows. A step's global batch is therefore the
  same at any world size, and the position (a step count) resumes exactly after a
  change of world size or worker count.
* ``stream``: WebDataset reads whole shards sequentially, shards shuffled per epoch and
  split over ranks and workers. Less random access, but its order depends on world size
  and worker count, so it resumes exactly only with both unchanged.

Corrupt data (`on_corrupt`): every sample's bytes are checked against the manifest's crc32 and
its ids against the vocabulary. "error" stops naming the shard and the sample. "skip" puts
another sample in its place, so batch shapes and the resume position are unchanged, and counts
it (`corrupt_skipped` in the batch; the trainer logs the total): indexed mode takes the next
readable sample in split order, stream mode the worker's previous good sample (an all-EOS row
if it has none yet). A missing or truncated shard is then skipped sample by sample too (a
warning names it at start-up); a tar that breaks mid-stream in stream mode still stops the run.
"""
from __future__ import annotations

import functools
import itertools
import os
import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, Dataset

from .remote import is_remote, tar_members
from .shards import (FIELD, ShardError, ShardIndex, check_seq_len, check_shard_files,
                     decode_sample, read_manifest)

MODES = ("indexed", "stream")
_STREAM_SHUFFLE_BUFFER = 1000  # samples; mixes rows of one shard so a batch is not one passage


def _epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_samples, generator=torch.Generator().manual_seed(_epoch_seed(seed, epoch)))


def _per_rank(global_batch_size: int, rank: int, world_size: int) -> int:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    if global_batch_size < 1 or global_batch_size % world_size:
        raise ValueError(f"global batch size {global_batch_size} is not a positive multiple of "
                         f"world_size {world_size}; every rank needs the same batch size")
    return global_batch_size // world_size


ON_CORRUPT = ("error", "skip")
_MAX_REPLACEMENTS = 1000  # consecutive unreadable samples before "skip" gives up


def _open_split(split_dir, seq_len: int | None, strict: bool = True) -> dict:
    manifest = read_manifest(split_dir)
    check_seq_len(manifest, seq_len, split_dir)
    if is_remote(split_dir):
        if hasattr(split_dir, "check_listed"):  # a brace pattern must name the manifest's shards
            split_dir.check_listed(manifest)
        return manifest  # sizes are checked as the shards stream (a short shard is a failed read)
    for problem in check_shard_files(split_dir, manifest, strict):  # strict: a truncated shard fails here
        print(f"[data] warning: {problem}; its samples are skipped (data.on_corrupt=skip)", flush=True)
    return manifest


def _as_long(row: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(row.astype(np.int64))


# ----------------------------------------------------------------------------- indexed
class _Samples(Dataset):
    """Sample i as (row, 1 if it replaced an unreadable sample else 0)."""

    def __init__(self, index: ShardIndex, skip: bool):
        self.index, self.skip = index, skip

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        if not self.skip:
            return _as_long(self.index[i]), 0
        for j in range(min(len(self.index), _MAX_REPLACEMENTS)):
            try:
                return _as_long(self.index[(i + j) % len(self.index)]), int(j > 0)
            except ShardError as e:
                last = e
        raise ShardError(f"{last}; and the {_MAX_REPLACEMENTS} samples after sample {i} are unreadable too: "
                         "data.on_corrupt=skip gives up")


class _RankSlices:
    """Batch sampler: this rank's slice of every global batch from start_step on, forever."""

    def __init__(self, num_samples: int, global_batch_size: int, rank: int, world_size: int,
                 seed: int, start_step: int):
        self.n, self.g, self.seed, self.start_step = num_samples, global_batch_size, seed, start_step
        self.b = global_batch_size // world_size
        self.offset = rank * self.b

    def __iter__(self) -> Iterator[list[int]]:
        steps_per_epoch = self.n // self.g
        perm, perm_epoch = None, None
        for step in itertools.count(self.start_step):
            epoch, s = divmod(step, steps_per_epoch)
            if epoch != perm_epoch:
                perm, perm_epoch = epoch_permutation(self.n, self.seed, epoch), epoch
            lo = s * self.g + self.offset
            yield perm[lo:lo + self.b].tolist()


# ----------------------------------------------------------------------------- stream
def _split_by_rank(src, rank: int, world_size: int):
    # Explicit rank/world size rather than wds.split_by_node, which asks torch.distributed.
    yield from itertools.islice(src, rank, None, world_size)


class _StreamDecoder:
    """webdataset sample -> (row, skipped), checking the manifest's crc32 (keys are global sample
    indices) and the vocabulary; with skip, a bad sample becomes this worker's previous good one."""

    def __init__(self, manifest: dict, skip: bool):
        self.seq_len, self.vocab, self.eos, self.skip = manifest["seq_len"], manifest["vocab_size"], manifest["eos_id"], skip
        self.crc = {}
        first = 0
        for e in manifest["shards"]:
            for j, c in enumerate(e.get("crc32", [])):
                self.crc[first + j] = c
            first += e["num_samples"]
        self.last: torch.Tensor | None = None

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        where = f"shard {sample.get('__url__')} sample {sample.get('__key__')}"
        try:
            if FIELD not in sample:
                raise ShardError(f"{where}: no {FIELD} member; the shard was not written by make_shards.py")
            key = sample.get("__key__", "")
            crc = self.crc.get(int(key)) if str(key).isdigit() else None
            row = _as_long(decode_sample(sample[FIELD], where, self.seq_len, crc, self.vocab))
        except ShardError:
            if not self.skip:
                raise
            return (self.last if self.last is not None else torch.full((self.seq_len,), self.eos)), 1
        self.last = row
        return row, 0


def _collate(samples: list[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([r for r, _ in samples]), torch.tensor(sum(k for _, k in samples))


class _ShardReader:
    """webdataset pipeline stage: {"url": shard name} -> samples {"__key__", "__url__", FIELD}, read
    by `remote.tar_members` from a local file or a remote location, with retries (remote only: a
    local read error is not transient) that resume a broken shard where it stopped."""

    def __init__(self, split, manifest: dict):
        self.split = split
        self.counts = {e["name"]: e["num_samples"] for e in manifest["shards"]}

    def __call__(self, src):
        for item in src:
            name = item["url"]
            if is_remote(self.split):
                where, opener = self.split.url(name), functools.partial(self.split.open, name)
                retries, backoff = self.split.retries, self.split.backoff_s
            else:
                where, retries, backoff = str(Path(self.split) / name), 0, 0.0
                opener = functools.partial(open, where, "rb")
            for member, data in tar_members(opener, where, self.counts[name], retries, backoff):
                key, _, field = member.partition(".")
                yield {"__key__": key, "__url__": where, field: data}


def stream_steps_per_epoch(shard_sizes: list[int], world_size: int, num_workers: int,
                           batch_size: int) -> int:
    """Batches that EVERY rank can produce in ANY epoch, whatever the shard shuffle.

    Ranks that could do more stop at this common count: DDP hangs if one rank ends its
    epoch earlier. Rank r, worker w of W reads shuffled positions r + R*w + R*W*j and
    batches its own stream (dropping its partial batch). Two lower bounds, both valid for
    every shuffle; the larger is used:
      * per worker: its shard count of the smallest shards, floored to batches;
      * per rank: the rank's shard count of the smallest shards, minus a partial batch
        lost in each worker: sum_w floor(S_w / b) >= (T - W * (b - 1)) / b.
    """
    workers = max(1, num_workers)
    slots = world_size * workers
    if len(shard_sizes) < slots:
        raise ValueError(f"stream mode needs at least world_size * num_workers = {world_size} * "
                         f"{workers} = {slots} shards, the split has {len(shard_sizes)}; re-run "
                         f"make_shards.py with a smaller --samples-per-shard, use fewer workers, "
                         f"or use mode=indexed")
    smallest = sorted(shard_sizes)
    per_rank = []
    for r in range(world_size):
        counts = [len(range(r + world_size * w, len(shard_sizes), slots)) for w in range(workers)]
        per_worker = sum(sum(smallest[:c]) // batch_size for c in counts)
        pooled = -(-(sum(smallest[:sum(counts)]) - workers * (batch_size - 1)) // batch_size)  # ceil
        per_rank.append(max(per_worker, pooled))
    return min(per_rank)


# ----------------------------------------------------------------------------- public
class TokenBatches:
    """`{"input_ids": LongTensor[global_batch_size // world_size, seq_len]}` forever, from
    global step `self.step` on; `state_dict()` after a batch resumes right after it."""

    def __init__(self, split_dir, *, global_batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, num_workers: int = 2, mode: str = "indexed", seq_len: int | None = None,
                 on_corrupt: str = "error"):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_corrupt not in ON_CORRUPT:
            raise ValueError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        if is_remote(split_dir) and mode != "stream":
            raise ValueError(f"{split_dir} is remote: it is read in stream mode (data.loader=stream); indexed mode "
                             "needs random access to local shards")
        self.skip = on_corrupt == "skip"
        self.split_dir = split_dir if is_remote(split_dir) else Path(split_dir)
        self.manifest = _open_split(self.split_dir, seq_len, strict=not self.skip)
        self.seq_len: int = self.manifest["seq_len"]
        self.num_samples: int = self.manifest["num_samples"]
        self.batch_size = _per_rank(global_batch_size, rank, world_size)  # per rank
        self.global_batch_size, self.rank, self.world_size = global_batch_size, rank, world_size
        self.seed, self.num_workers, self.mode = seed, num_workers, mode
        self.step = 0
        if mode == "indexed":
            self.steps_per_epoch = self.num_samples // global_batch_size
            # Scan tar headers here, once: workers inherit the index, and a corrupt shard
            # fails now in this process rather than later inside a worker.
            self._index = ShardIndex(self.split_dir, self.manifest).scan_all(skip_bad=self.skip)
        else:
            sizes = [s["num_samples"] for s in self.manifest["shards"]]
            self.steps_per_epoch = stream_steps_per_epoch(sizes, world_size, num_workers, self.batch_size)
        if self.steps_per_epoch < 1:
            raise ValueError(f"{self.split_dir} has {self.num_samples} samples, not enough for one "
                             f"{mode} step of global batch size {global_batch_size} on {world_size} "
                             f"rank(s); lower the batch size or add data")

    @property
    def epoch(self) -> int:
        return self.step // self.steps_per_epoch

    def __iter__(self) -> Iterator[dict]:
        batches = self._indexed() if self.mode == "indexed" else self._stream()
        for batch, skipped in batches:
            self.step += 1  # before the yield: a checkpoint taken after this batch skips it
            yield {"input_ids": batch, "corrupt_skipped": int(skipped.sum())}

    def _indexed(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        sampler = _RankSlices(self.num_samples, self.global_batch_size, self.rank, self.world_size,
                              self.seed, start_step=self.step)
        dataset = _Samples(self._index, self.skip)
        # Workers fetch whole batches in parallel; DataLoader returns them in sampler order.
        yield from DataLoader(dataset, batch_sampler=sampler, num_workers=self.num_workers)

    def _stream_loader(self, epoch: int) -> DataLoader:
        names = [s["name"] for s in self.manifest["shards"]]
        # Same seeded order on every rank, so the rank/worker split below is disjoint.
        random.Random(_epoch_seed(self.seed, epoch)).shuffle(names)
        dataset = wds.DataPipeline(
            wds.SimpleShardList(names),
            functools.partial(_split_by_rank, rank=self.rank, world_size=self.world_size),
            wds.split_by_worker,
            _ShardReader(self.split_dir, self.manifest),
            wds.shuffle(_STREAM_SHUFFLE_BUFFER, seed=_epoch_seed(self.seed, epoch) * 1009 + self.rank),
            wds.map(_StreamDecoder(self.manifest, self.skip)),
            wds.batched(self.batch_size, collation_fn=_collate, partial=False))
        return DataLoader(dataset, batch_size=None, num_workers=self.num_workers)

    def _stream(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            epoch, done = divmod(self.step, self.steps_per_epoch)
            batches = iter(self._stream_loader(epoch))
            # Resume: the epoch's order is deterministic, so skip what was already consumed.
            for i in range(self.steps_per_epoch):
                batch = next(batches, None)
                if batch is None:  # cannot happen unless shards changed under the manifest
                    raise ShardError(f"{self.split_dir}: epoch {epoch} ended after {i} batches on rank "
                                     f"{self.rank}, expected {self.steps_per_epoch}; check the shards "
                                     f"with data_tools/inspect_shards.py")
                if i >= done:
                    yield batch
            del batches  # shuts the epoch's workers down before the next epoch starts its own

    def global_indices(self, step: int) -> list[int] | None:
        """Sample indices (in the split) of the whole global batch of optimizer step `step`
        (0-based); None in stream mode, whose order lives in the shard shuffle."""
        if self.mode != "indexed":
            return None
        epoch, s = divmod(step, self.steps_per_epoch)
        g = self.global_batch_size
        return epoch_permutation(self.num_samples, self.seed, epoch)[s * g:(s + 1) * g].tolist()

    # ------------------------------------------------------------------ checkpointing
    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "global_batch_size": self.global_batch_size,
                "world_size": self.world_size, "mode": self.mode, "num_samples": self.num_samples,
                "num_workers": self.num_workers}

    def load_state_dict(self, sd: dict) -> None:
        def same(key: str, why: str) -> None:
            if sd[key] != getattr(self, key):
                raise ValueError(f"data loader state has {key}={sd[key]!r} but this loader has "
                                 f"{key}={getattr(self, key)!r}; {why}")

        same("mode", "the sample order differs between modes, resume with the same data.loader mode")
        same("num_samples", f"the data in {self.split_dir} changed since the checkpoint; "
                            f"resume on the same shards")
        same("global_batch_size", "keep train.global_batch_size (the per-step sample set depends on it)")
        same("seed", "keep train.seed (the epoch permutation depends on it)")
        if self.mode == "stream":
            if sd["world_size"] != self.world_size:
                raise ValueError(f"stream-mode data loader state was saved with world_size="
                                 f"{sd['world_size']} but this run has world_size={self.world_size}; "
                                 f"stream order depends on it: use mode=indexed (data.loader=indexed) "
                                 f"or the same world size")
            same("num_workers", "stream order depends on it: use the same data.num_workers "
                                "or mode=indexed")
        self.step = int(sd["step"])


class _SequentialRemote:
    """Samples 0, 1, 2, ... of a remote split, read shard by shard in order (eval_batches asks in order)."""

    def __init__(self, split, manifest: dict):
        self.split, self.manifest = split, manifest
        self.rows: list[np.ndarray] = []
        self._it = self._read()

    def _read(self) -> Iterator[np.ndarray]:
        decode = _StreamDecoder(self.manifest, skip=False)
        for sample in _ShardReader(self.split, self.manifest)(
                {"url": e["name"]} for e in self.manifest["shards"]):
            yield decode(sample)[0].numpy()

    def __len__(self) -> int:
        return self.manifest["num_samples"]

    def __getitem__(self, i: int) -> np.ndarray:
        while len(self.rows) <= i:
            self.rows.append(next(self._it))
        return self.rows[i]


def eval_batches(split_dir, *, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None, seq_len: int | None = None) -> Iterator[dict]:
    """Deterministic validation batches (no shuffle): sample order 0..N-1, global batch i is
    rows [i*batch_size, (i+1)*batch_size), split across ranks like training. The last
    partial batch is dropped so every rank yields the same number of batches.

    Problems (missing split, seq_len mismatch, bad batch size) raise here, not on first next().
    """
    manifest = _open_split(split_dir, seq_len)
    b = _per_rank(batch_size, rank, world_size)
    index = _SequentialRemote(split_dir, manifest) if is_remote(split_dir) else ShardIndex(split_dir, manifest)
    n = len(index) // batch_size
    if n == 0:
        raise ValueError(f"{split_dir} has {len(index)} samples, fewer than one eval batch of "
                         f"{batch_size}; lower the eval batch size")
    if max_batches is not None:
        n = min(n, max_batches)

    def batches() -> Iterator[dict]:
        for i in range(n):
            lo = i * batch_size + rank * b
            yield {"input_ids": torch.from_numpy(np.stack([index[j] for j in range(lo, lo + b)]).astype(np.int64))}

    return batches()
