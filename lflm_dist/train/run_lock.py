"""One training run per run dir at a time.

Two runs writing the same `run.dir` would interleave checkpoints and metrics. The trainer's
main rank holds an advisory `flock` on RUN_DIR/.lock for the whole run; a second run finds it
taken and stops with an error naming the holder (pid, host, start time, written into the file).
The kernel drops the lock when its process exits, however it exits (SIGKILL included), so a dead
run never leaves the dir stuck; the file stays (deleting it would race with the next run that
opened it) and only its contents describe the last holder. flock is per host on some network
filesystems: two runs on different nodes sharing one run dir are not caught there.
"""
from __future__ import annotations

import datetime
import fcntl
import json
import os
import socket
from pathlib import Path

from lflm_dist.config import ConfigError


class RunDirInUse(ConfigError):
    """Another live process holds the run dir."""


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self.holder()
            os.close(fd)
            who = (f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('started')}" if holder
                   else "another process")
            raise RunDirInUse(f"run.dir {self.run_dir} is in use by another training run ({who}): wait for it to "
                              "finish or stop it, or set run.dir to another directory. The lock is released when "
                              "that process exits, however it exits.") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(),
                "started": datetime.datetime.now().isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        self.fd = fd
        return self

    def holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __del__(self):
        self.release()
