"""metrics.jsonl + wandb + a tqdm bar, all on rank 0 only."""
from __future__ import annotations

import json
import os
import sys
import uuid
import warnings
from pathlib import Path

from tqdm import tqdm

from lflm_dist.config import Config, to_dict


class MetricsLogger:
    def __init__(self, cfg: Config, run_dir: Path, is_main: bool, resume_step: int = 0, extra: dict | None = None):
        self.is_main = is_main
        self.path = run_dir / "metrics.jsonl"
        self.wandb = None
        if not is_main:
            return
        self._truncate_after(resume_step)
        if cfg.run.wandb_mode != "disabled":
            self.wandb = _init_wandb(cfg, run_dir, extra or {})

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (a crash can log steps that the
        checkpoint does not hold); those steps are re-run and logged again."""
        if not self.path.is_file():
            return
        keep = [ln for ln in self.path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(ln + "\n" for ln in keep))
        os.replace(tmp, self.path)

    def progress(self, start: int, total: int):
        return tqdm(total=total, initial=start, disable=not self.is_main, desc="train", dynamic_ncols=True,
                    file=sys.stderr, mininterval=1.0)

    def log(self, metrics: dict) -> None:
        if not self.is_main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if k != "step"}, step=int(metrics["step"]))

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()


def _init_wandb(cfg: Config, run_dir: Path, extra: dict):
    os.environ.setdefault("WANDB_MODE", cfg.run.wandb_mode)
    os.environ.setdefault("WANDB_SILENT", "true")
    try:
        import wandb

        run_id_file = run_dir / "wandb_id.txt"
        run_id = run_id_file.read_text().strip() if run_id_file.is_file() else uuid.uuid4().hex[:8]
        run_id_file.write_text(run_id)
        return wandb.init(project=cfg.run.wandb_project, name=cfg.run.name or run_dir.name, dir=str(run_dir),
                          id=run_id, resume="allow", config={**to_dict(cfg), **extra})
    except Exception as e:  # logging must never kill a training run
        warnings.warn(f"wandb disabled: {type(e).__name__}: {e}")
        return None
