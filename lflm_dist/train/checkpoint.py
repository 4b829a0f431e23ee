"""Atomic, safe-to-load checkpoints.

Layout of `<run.dir>/checkpoints/step_XXXXXXXX/`:
  model.safetensors     model weights and buffers (rank 0)
  optimizer.pt          optimizer state (torch.save of tensors/numbers; loaded weights_only)
  trainer.json          step, world size, data-loader position, schedule
  rng_rank{R}.pt        each rank's RNG states (torch, numpy, python)
A checkpoint is written into `.tmp-step_X` and renamed when complete, so a crash while
saving never leaves a half checkpoint that resume would pick up.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lflm_dist.train.dist import barrier

_STEP_RE = re.compile(r"^step_(\d{8})$")


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return None
    steps = sorted(p for p in d.iterdir() if _STEP_RE.match(p.name) and (p / "trainer.json").is_file())
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir, or a run dir (its latest checkpoint)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"no checkpoint found at {p}: expected a run dir with checkpoints/step_*/ "
                                "or a checkpoint dir holding model.safetensors")
    return latest


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


def save_checkpoint(run_dir, step: int, model, optimizer, trainer_state: dict, rank: int, keep: int = 2) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    root = checkpoint_dir(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    torch.save(_rng_for_save(), tmp / f"rng_rank{rank}.pt")
    if rank == 0:
        save_file(model_state(model), tmp / "model.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer_state, indent=2))
    barrier()
    if rank == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _prune(root, keep)
    barrier()
    return final


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


def _prune(root: Path, keep: int) -> None:
    steps = sorted(p for p in root.iterdir() if _STEP_RE.match(p.name))
    for old in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load_model_weights(model: torch.nn.Module, path: Path, strict: bool = True) -> None:
    state = load_file(str(path / "model.safetensors") if path.is_dir() else str(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if strict and (missing or unexpected):
        raise RuntimeError(f"checkpoint {path} does not match the model: missing keys {missing[:5]}, "
                           f"unexpected keys {unexpected[:5]}; was it written with a different model config?")


def load_trainer_state(path: Path) -> dict:
    return json.loads((path / "trainer.json").read_text())


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
