"""IsoFLOP plan (Chinchilla approach 2): every run of a budget costs the same training FLOPs.

For each family, budget and size, each stage's model is built on the meta device (no memory,
no weights) and its own `flops_per_token()` gives the stage's cost; the stage gets
`compute_fraction` of the budget, so steps = fraction * budget / (flops_per_token * tokens_per_step),
rounded to whole steps. A run's FLOPs are the sum over its stages, its N the trainable parameters
of the last stage's model (the one evaluated), its D the tokens of all stages.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from lflm_dist.config import ConfigError, load_config
from lflm_dist.sweeps.config import SweepConfig

DIR_REF = re.compile(r"\{dir:([\w.-]+)\}")


@dataclass
class StagePlan:
    name: str
    config: str
    overrides: list[str]  # complete: the stage trains as `pretrain.py --config CONFIG *overrides`
    run_dir: str
    steps: int
    tokens_per_step: int
    flops_per_token: float
    params: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step

    @property
    def flops(self) -> float:
        return self.steps * self.tokens_per_step * self.flops_per_token


@dataclass
class RunPlan:
    family: str
    size: str
    budget: float
    dir: str
    stages: list[StagePlan] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return f"{self.family}/{budget_tag(self.budget)}/{self.size}"

    @property
    def params(self) -> int:
        return self.stages[-1].params

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    @property
    def flops(self) -> float:
        return sum(s.flops for s in self.stages)

    def key(self) -> str:
        """Fingerprint of what the run trains: a finished result with another key is stale."""
        blob = json.dumps([[s.config, s.overrides] for s in self.stages])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {**asdict(self), "run_id": self.run_id, "params": self.params, "tokens": self.tokens,
                "flops": self.flops, "key": self.key(),
                "stages": [{**asdict(s), "tokens": s.tokens, "flops": s.flops} for s in self.stages]}


def budget_tag(flops: float) -> str:
    return f"C{flops:.3g}".replace("+", "")


def stage_cost(config: str, overrides: list[str], vocab_cache: dict) -> tuple[int, float, int, object]:
    """(trainable params, training FLOPs per token, tokens per optimizer step, resolved config) of
    a stage, from its model built on the meta device."""
    from lflm_dist.models.registry import build_model, count_params

    cfg = load_config(config, overrides)
    if cfg.model.vocab_size <= 0:  # as the trainer does: the vocabulary is the data dir's tokenizer's
        tok = Path(cfg.data.path) / "tokenizer.json"
        if str(tok) not in vocab_cache:
            if not tok.is_file():
                raise ConfigError(f"{config}: model.vocab_size=0 takes the vocabulary from {tok}, which does not "
                                  "exist; prepare the data (make data) or set model.vocab_size")
            from lflm_dist.data.tokenizer import Tokenizer
            vocab_cache[str(tok)] = Tokenizer.load(tok).vocab_size
        cfg.model.vocab_size = vocab_cache[str(tok)]
    model = build_model(cfg.model, device="meta")
    return count_params(model), float(model.flops_per_token()), cfg.train.global_batch_size * cfg.model.seq_len, cfg


def make_plan(cfg: SweepConfig) -> list[RunPlan]:
    root = Path(cfg.sweep.dir)
    vocab_cache: dict = {}
    runs = []
    for family, fam in cfg.families.items():
        for budget in cfg.budgets:
            for size in budget.sizes or list(fam.sizes):
                run = RunPlan(family, size, budget.flops, "")
                run.dir = str(root / "runs" / run.run_id)
                dirs: dict[str, str] = {}
                for stage in fam.stages:
                    run_dir = str(Path(run.dir) / stage.name)
                    base = (list(cfg.sweep.overrides) + list(fam.overrides) + list(fam.sizes[size])
                            + [_fill_dirs(o, dirs, f"families.{family}.stages.{stage.name}") for o in stage.overrides]
                            + [f"run.dir={run_dir}"])
                    params, fpt, tps, _ = stage_cost(stage.config, base + ["train.max_steps=1"], vocab_cache)
                    steps = max(1, round(stage.compute_fraction * budget.flops / (fpt * tps)))
                    extra = [f"train.max_steps={steps}"]
                    if cfg.sweep.warmup_fraction > 0:
                        extra.append(f"train.warmup_steps={max(1, min(steps - 1, round(cfg.sweep.warmup_fraction * steps)))}")
                    run.stages.append(StagePlan(stage.name, stage.config, base + extra, run_dir, steps, tps, fpt, params))
                    dirs[stage.name] = run_dir
                runs.append(run)
    return runs


def _fill_dirs(override: str, dirs: dict[str, str], where: str) -> str:
    def sub(m):
        if m.group(1) not in dirs:
            raise ConfigError(f"{where}: {m.group(0)} names no earlier stage (earlier: {list(dirs) or 'none'})")
        return dirs[m.group(1)]
    return DIR_REF.sub(sub, override)


def format_plan(runs: list[RunPlan]) -> str:
    """The plan table: one row per run, stages' steps joined by '+'."""
    head = ("family", "size", "budget", "params", "tokens", "steps", "FLOPs", "FLOPs/budget")
    rows = [(r.family, r.size, f"{r.budget:.3g}", f"{r.params / 1e6:.3f}M", f"{r.tokens:.4g}",
             "+".join(str(s.steps) for s in r.stages), f"{r.flops:.4g}", f"{r.flops / r.budget:.4f}") for r in runs]
    w = [max(len(str(x)) for x in col) for col in zip(head, *rows)]
    line = lambda row: "  ".join(str(x).ljust(n) for x, n in zip(row, w))  # noqa: E731
    stages = sorted({f"{r.family}: " + " -> ".join(f"{s.name} ({s.config})" for s in r.stages) for r in runs})
    return "\n".join([line(head), line(["-" * n for n in w])] + [line(r) for r in rows] + ["", "stages:"]
                     + [f"  {s}" for s in stages])
