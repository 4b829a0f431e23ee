"""Shards from object storage or HTTP: `data.path` may be a URL prefix or a `pipe:` command.

  data.path: https://host/data                         files at https://host/data/<path>
  data.path: "pipe:aws s3 cp s3://bucket/data/{path} -" the command prints <path> to stdout
  data.train_split: "https://host/train/shard-{000000..000099}.tar"   a split as a webdataset brace
  data.train_split: "pipe:aws s3 cp s3://b/train/shard-{000000..000099}.tar -"   pattern (RemoteShards)

The layout under it is a local data dir's (tokenizer.json, <split>/manifest.json, the shards the
manifest lists), so the manifest says which shards exist (no brace patterns to keep in sync).
Remote splits are read in `data.loader: stream` mode (sequential reads; indexed mode needs random
access). Every read retries with a bounded exponential back-off (`data.retries`,
`data.retry_backoff_s`, at most `MAX_BACKOFF_S` between tries); a shard that breaks mid-read is
re-opened and the samples already delivered are skipped, so a dropped connection costs a re-read,
never a sample; after the retries the run stops with an error naming the shard, never a silent
short epoch (a shard that ends early without an error counts as a failed read too).
"""
from __future__ import annotations

import hashlib
import http.client
import os
import subprocess
import sys
import tarfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable, Iterator

MAX_BACKOFF_S = 30.0
TIMEOUT_S = 60.0
_READ_ERRORS = (OSError, EOFError, tarfile.TarError, http.client.HTTPException, urllib.error.URLError)


class RemoteReadError(OSError):
    """A read that ended wrongly (early end, a failing pipe command): retried like an I/O error."""


def is_remote(location) -> bool:
    return isinstance(location, (str, RemoteDir)) and str(location).startswith(("http://", "https://", "pipe:"))


class RemoteDir:
    """A directory behind HTTP(S) or a pipe command; `child` descends, `open` streams a file."""

    def __init__(self, base: str, prefix: str = "", retries: int = 5, backoff_s: float = 1.0):
        self.base = base if base.startswith("pipe:") else base.rstrip("/")
        self.prefix, self.retries, self.backoff_s = prefix, retries, backoff_s

    def child(self, name: str) -> "RemoteDir":
        return RemoteDir(self.base, f"{self.prefix}{name.strip('/')}/", self.retries, self.backoff_s)

    def url(self, name: str) -> str:
        path = f"{self.prefix}{name}"
        return self.base.replace("{path}", path) if self.base.startswith("pipe:") else f"{self.base}/{path}"

    def __str__(self) -> str:
        return self.url("").rstrip("/") if not self.base.startswith("pipe:") else f"{self.base} (path={self.prefix})"

    def open(self, name: str):
        """A readable binary stream of the file (a context manager)."""
        url = self.url(name)
        if url.startswith("pipe:"):
            return _PipeStream(url[len("pipe:"):])
        return urllib.request.urlopen(url, timeout=TIMEOUT_S)

    def read_bytes(self, name: str) -> bytes:
        def read():
            with self.open(name) as f:
                return f.read()
        return with_retries(read, self.url(name), self.retries, self.backoff_s)

    def cached(self, name: str) -> Path:
        """A local copy of a small file (tokenizer.json), fetched once per location into the cache."""
        root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lflm_dist" / "remote"
        path = root / hashlib.sha256(self.url(name).encode()).hexdigest()[:20] / name
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            tmp.write_bytes(self.read_bytes(name))
            os.replace(tmp, path)
        return path


class RemoteShards(RemoteDir):
    """A split given as webdataset users write it: a brace pattern of shard URLs or pipe commands,
    `https://host/train/shard-{000000..000099}.tar` or
    `pipe:aws s3 cp s3://bucket/train/shard-{000000..000099}.tar -`, with manifest.json beside the
    shards (the same URL or command with the shard's file name replaced). The pattern must list
    exactly the shards the manifest lists."""

    def __init__(self, spec: str, retries: int = 5, backoff_s: float = 1.0):
        import braceexpand
        expanded = list(braceexpand.braceexpand(spec))
        names = [_shard_file(u) for u in expanded]
        first = expanded[0]
        template = first.replace(names[0], "{name}")
        if any(u != template.replace("{name}", n) for u, n in zip(expanded, names)):
            raise ValueError(f"{spec}: every expanded shard must differ only in its file name (one directory)")
        super().__init__(template, "", retries, backoff_s)
        self.spec, self.names = spec, names

    def url(self, name: str) -> str:
        return self.base.replace("{name}", name)

    def child(self, name: str) -> "RemoteShards":
        raise ValueError(f"{self.spec} is a split's shard pattern, not a data dir")

    def __str__(self) -> str:
        return self.spec

    def check_listed(self, manifest: dict) -> None:
        listed = [e["name"] for e in manifest["shards"]]
        if sorted(self.names) != sorted(listed):
            extra, missing = sorted(set(self.names) - set(listed)), sorted(set(listed) - set(self.names))
            from lflm_dist.data.shards import ShardError
            raise ShardError(f"{self.spec} does not name the shards its manifest {self.url('manifest.json')} lists: "
                             f"not in the manifest {extra[:3]}, missing from the pattern {missing[:3]}")


def _shard_file(url: str) -> str:
    import re
    m = re.findall(r"[^/\s]+\.tar", url)
    if not m:
        raise ValueError(f"{url}: no shard file name (NAME.tar) in it")
    return m[-1]


class _PipeStream:
    """stdout of a shell command; a non-zero exit status is a read error (raised at close)."""

    def __init__(self, cmd: str):
        self.cmd = cmd
        self.proc = subprocess.Popen(cmd, shell=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def read(self, n: int = -1) -> bytes:
        return self.proc.stdout.read(n)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.proc.stdout.close()
        err = self.proc.stderr.read().decode(errors="replace")[-500:]
        if self.proc.wait() != 0 and exc[0] is None:
            raise RemoteReadError(f"command {self.cmd!r} exited with {self.proc.returncode}: {err}")
        return False


def with_retries(fn: Callable, what: str, retries: int, backoff_s: float):
    for attempt in range(retries + 1):
        try:
            return fn()
        except _READ_ERRORS as e:
            if attempt == retries:
                from lflm_dist.data.shards import ShardError
                raise ShardError(f"{what}: {e!r} after {retries} retries; check the connection, the URL or "
                                 "the command (data.retries, data.retry_backoff_s)") from None
            _wait(what, e, attempt, retries, backoff_s)


def _wait(what: str, e: Exception, attempt: int, retries: int, backoff_s: float) -> None:
    delay = min(MAX_BACKOFF_S, backoff_s * 2 ** attempt)
    print(f"[data] {what}: {e!r}; retry {attempt + 1}/{retries} in {delay:g} s", file=sys.stderr, flush=True)
    time.sleep(delay)


def tar_members(opener: Callable, what: str, expected: int | None, retries: int,
                backoff_s: float) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of every file in a tar stream, in order. A read that fails or ends before
    `expected` members is retried from the start, skipping the members already yielded; after
    `retries` failures a ShardError names the shard and how far it got."""
    done = 0
    for attempt in range(retries + 1):
        try:
            seen = 0
            with opener() as stream:
                with tarfile.open(fileobj=stream, mode="r|") as tf:
                    for m in tf:
                        if not m.isfile():
                            continue
                        data = tf.extractfile(m).read()
                        if len(data) != m.size:
                            raise RemoteReadError(f"member {m.name} short: {len(data)} of {m.size} bytes")
                        if seen >= done:
                            done += 1
                            yield m.name, data
                        seen += 1
            if expected is not None and seen < expected:
                raise RemoteReadError(f"the shard ended after {seen} of its {expected} samples")
            return
        except _READ_ERRORS as e:
            if attempt == retries:
                from lflm_dist.data.shards import ShardError
                raise ShardError(f"shard {what}: {e!r}; gave up after {retries} retries, having read {done} of "
                                 f"{expected if expected is not None else '?'} samples; check the connection or "
                                 "the shard (data.retries, data.retry_backoff_s)") from None
            _wait(f"shard {what}", e, attempt, retries, backoff_s)
