"""Atomic, safe-to-load checkpoints.

Layout of `<run.dir>/checkpoints/step_XXXXXXXX/`, by strategy (trainer.json "format"):
  model.safetensors     ddp: model weights and buffers (rank 0)
  optimizer.pt          ddp: optimizer state (torch.save of tensors/numbers; loaded weights_only)
  dcp/                  fsdp2 and tp: torch.distributed.checkpoint of {"model", "optim"}
                        (reshardable; TP shards are DTensors of the weight's canonical view)
  deepspeed/            deepspeed: DeepSpeed's native save_checkpoint (ZeRO partitions)
  trainer.json          step, world size, strategy, data-loader position, schedule
  rng_rank{R}.pt        each rank's RNG states (torch, numpy, python)
A checkpoint is written into `.tmp-step_X` and renamed when complete, so a crash while
saving never leaves a half checkpoint that resume would pick up (resume reports the leftover).
trainer.json, written last, records every other file's size and (train.checkpoint_hashes) sha256;
resume refuses a checkpoint whose files do not match. A write that runs out of space removes its
partial directory and stops with an error saying the previous checkpoint is intact.
`<run.dir>/DONE` (JSON {"step": N}) is written after the final evaluation: the run reached
train.max_steps. Batch scripts skip a stage whose run dir has it (slurm/stages.sh).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from lflm_dist.train.dist import barrier

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class CheckpointError(ValueError):
    """A checkpoint that cannot be written (no space) or trusted (files differ from its record)."""

_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


DONE = "DONE"


def mark_done(run_dir: str | Path, step: int) -> None:
    (Path(run_dir) / DONE).write_text(json.dumps({"step": step}) + "\n")


def clear_done(run_dir: str | Path) -> None:
    (Path(run_dir) / DONE).unlink(missing_ok=True)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return None
    steps = sorted(p for p in d.iterdir() if _STEP_RE.match(p.name) and (p / "trainer.json").is_file())
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint)."""
    p = Path(path)
    if (p / "model.safetensors").is_file() or (p / "trainer.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found at {p}: expected a run dir with checkpoints/step_*/ "
                                "or a checkpoint dir holding model.safetensors")
    return latest


def checkpoint_format(path: Path) -> str:
    tj = path / "trainer.json"
    if tj.is_file():
        return json.loads(tj.read_text()).get("format", "safetensors")
    return "safetensors"


def read_model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Unsharded model state (FQN -> tensor) of any checkpoint, read offline in one process:
    safetensors as is, DCP via its metadata (TP canonical views reshaped back to 2-D by the
    caller's model shapes), DeepSpeed ZeRO via its zero_to_fp32 reader."""
    path = resolve_checkpoint(path)
    fmt = checkpoint_format(path)
    if fmt == "safetensors":
        return load_file(str(path / "model.safetensors"))
    if fmt == "dcp":
        from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
        state = _load_state_dict_from_keys(keys={"model"}, checkpoint_id=str(path / "dcp"))
        return dict(state["model"])
    if fmt == "deepspeed":
        import os
        os.environ.setdefault("DS_ACCELERATOR", "cuda" if torch.cuda.is_available() else "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        return dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag="deepspeed"))
    raise ValueError(f"{path}: unknown checkpoint format {fmt!r}")


def load_state_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source="checkpoint",
                    strict: bool = True) -> None:
    """Load an unsharded state into a plain model; tensors stored in another (TP canonical)
    view of the same size are reshaped to the model's shape."""
    own = model.state_dict()
    # megatron's parallel linears add `_extra_state` entries (None); a plain model has none
    state = {k: v for k, v in state.items() if not (k.endswith("._extra_state") and k not in own)}
    fixed = {k: (v.reshape(own[k].shape) if k in own and v.shape != own[k].shape and v.numel() == own[k].numel()
                 else v) for k, v in state.items()}
    missing, unexpected = model.load_state_dict(fixed, strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(f"{source} does not match the model: missing keys {missing[:5]}, "
                           f"unexpected keys {unexpected[:5]}; was it written with a different model config?")


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_checkpoint(run_dir, step: int, model, optimizer, trainer_state: dict, rank: int, keep: int = 2,
                    engine=None, keep_every: int = 0, hashes: bool = True, crash_before_commit: bool = False) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path. With an `engine`
    (lflm_dist.parallel.engine), model and optimizer state are written by the engine in its
    strategy's format; otherwise rank 0 writes model.safetensors + optimizer.pt."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    error = None
    try:
        torch.save(_rng_for_save(), tmp / f"rng_rank{rank}.pt")
        if engine is not None:
            engine.save(tmp, rank)
        elif rank == 0:
            save_file(model_state(model), tmp / "model.safetensors")
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save reports a full disk as a RuntimeError
        error = e  # of its zip writer, safetensors as a SafetensorError ("No space left on device")
    _stop_if_failed(error, rank, tmp, root)
    if crash_before_commit:  # fault injection (train.inject_kill_in_checkpoint): die with the write half done
        os.kill(os.getpid(), 9)
    try:
        if rank == 0:  # trainer.json last: its presence marks a complete checkpoint
            state = {**trainer_state, "files": file_records(tmp, hashes)}
            (tmp / "trainer.json").write_text(json.dumps(state, indent=2))
    except OSError as e:
        error = e
    _stop_if_failed(error, rank, tmp, root)
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep, keep_every)  # only once the new one is complete
    barrier()
    return final


def _stop_if_failed(error: Exception | None, rank: int, tmp: Path, root: Path) -> None:
    """Collective: if any rank's write failed, remove the partial checkpoint and stop every rank."""
    failed = torch.tensor([0.0 if error is None else 1.0])
    if torch.distributed.is_initialized():
        nccl = torch.distributed.get_backend() == "nccl"
        failed = failed.cuda() if nccl else failed
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
    if not failed.item():
        return
    no_space = error is not None and (getattr(error, "errno", None) in _NO_SPACE
                                      or shutil.disk_usage(root).free < 2**20)  # checked before the cleanup
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    prev = sorted(p.name for p in root.iterdir() if _STEP_RE.match(p.name) and (p / "trainer.json").is_file())
    intact = f"the newest complete checkpoint, {root / prev[-1]}, is intact" if prev else "no earlier checkpoint exists"
    if no_space:
        raise CheckpointError(f"no space left writing checkpoint {tmp.name[5:]} in {root} ({error}): the "
                              f"partial checkpoint was removed and {intact}; nothing else was deleted. Free space "
                              "(or lower train.keep_checkpoints) and re-run the same command to resume.")
    why = f"{error!r}" if error is not None else "another rank failed"
    raise CheckpointError(f"writing checkpoint {tmp.name[5:]} in {root} failed ({why}): the partial checkpoint was "
                          f"removed and {intact}; re-run the same command to resume.")


def file_records(ckpt: Path, hashes: bool = True) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file of a checkpoint but trainer.json."""
    out = {}
    for f in sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "trainer.json"):
        rec = {"bytes": f.stat().st_size}
        if hashes:
            with open(f, "rb") as fh:
                rec["sha256"] = hashlib.file_digest(fh, "sha256").hexdigest()
        out[str(f.relative_to(ckpt))] = rec
    return out


def verify_checkpoint(path: Path) -> list[str]:
    """Files that are missing, or differ in size or sha256 from what trainer.json recorded."""
    recorded = json.loads((path / "trainer.json").read_text()).get("files")
    if recorded is None:  # written before files were recorded
        return []
    have = file_records(path, hashes=any("sha256" in r for r in recorded.values()))
    problems = []
    for name, rec in recorded.items():
        got = have.get(name)
        if got is None:
            problems.append(f"{name} is missing")
        elif got["bytes"] != rec["bytes"]:
            problems.append(f"{name} has {got['bytes']} bytes, {rec['bytes']} were written")
        elif "sha256" in rec and got["sha256"] != rec["sha256"]:
            problems.append(f"{name} differs from what was written (sha256 {got['sha256'][:12]}... vs {rec['sha256'][:12]}...)")
    return problems


def incomplete_checkpoints(run_dir: str | Path) -> list[Path]:
    """Leftovers of checkpoint writes that never completed (a process killed while saving)."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith(".tmp-step_")
                  or (_STEP_RE.match(p.name) and not (p / "trainer.json").is_file()))


def _rng_for_save() -> dict:
    s = rng_state()
    # numpy's state tuple holds an ndarray; store it as a tensor so weights_only loading works.
    name, keys, pos, has_gauss, cached = s["numpy"]
    s["numpy"] = (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached)
    s["python"] = (s["python"][0], list(s["python"][1]), s["python"][2])
    return s


def load_rng(path: Path) -> None:
    s = torch.load(path, weights_only=True)
    name, keys, pos, has_gauss, cached = s["numpy"]
    s["numpy"] = (name, keys.numpy().astype(np.uint32), pos, has_gauss, cached)
    s["python"] = (s["python"][0], tuple(s["python"][1]), s["python"][2])
    set_rng_state(s)


def _prune(root: Path, keep: int, keep_every: int = 0) -> None:
    """Keep the newest `keep` checkpoints, and every one whose step is a multiple of keep_every."""
    steps = sorted(p for p in root.iterdir() if _STEP_RE.match(p.name))
    for old in steps[:-keep] if keep > 0 else []:
        if keep_every > 0 and int(old.name.split("_")[1]) % keep_every == 0:
            continue
        shutil.rmtree(old, ignore_errors=True)


def load_model_weights(model: torch.nn.Module, path: Path, strict: bool = True) -> None:
    """Weights of any checkpoint format (or a .safetensors file) into a plain model."""
    path = Path(path)
    state = read_model_state(path) if path.is_dir() else load_file(str(path))
    load_state_into(model, state, f"checkpoint {path}", strict)


def load_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer.json").read_text())


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
