"""Sweep configuration: typed dataclasses from YAML with dotted overrides, as lflm_dist/config.py
does for runs (unknown keys and wrong types are errors naming the dotted key).

A sweep names model families, each with its stages (one base run config per stage: a family that
trains in two stages, like Cola's VAE then joint stage, lists two), its sizes (dotted overrides of
every stage's config) and the compute budgets in FLOPs. Nothing here knows a family by name.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lflm_dist.config import ConfigError, from_dict, read_raw
from lflm_dist.eval.likelihood import BoundSettings


@dataclass
class StageSpec:
    name: str = "main"  # names this stage's run dir; later stages refer to it as {dir:NAME}
    config: str = ""  # base run config (configs/*.yaml)
    compute_fraction: float = 1.0  # share of the run's FLOP budget spent in this stage
    overrides: list[str] = field(default_factory=list)  # "{dir:NAME}" -> run dir of earlier stage NAME


@dataclass
class FamilySpec:
    stages: list[StageSpec] = field(default_factory=list)
    sizes: dict[str, list[str]] = field(default_factory=dict)  # size name -> overrides of every stage
    overrides: list[str] = field(default_factory=list)  # every stage of every size of this family


@dataclass
class BudgetSpec:
    flops: float = 0.0  # training FLOPs of one run, all its stages together
    sizes: list[str] = field(default_factory=list)  # size names run at this budget; empty: every size


@dataclass
class SlurmSpec:
    partition: str = ""
    account: str = ""
    qos: str = ""
    timeout_min: int = 240
    cpus_per_task: int = 8
    gpus_per_node: int = 0
    mem_gb: int = 0  # 0: the partition's default
    array_parallelism: int = 64
    additional: dict[str, str] = field(default_factory=dict)  # extra #SBATCH options, e.g. {constraint: h100}


@dataclass
class SweepSection:
    name: str = "sweep"
    dir: str = "runs/sweeps/sweep"  # plan, per-run metrics, report
    cluster: str = "auto"  # auto (slurm when a SLURM controller answers, else local) | slurm | local
    local_parallel: int = 1  # local: runs at a time (each is a process)
    local_timeout_min: int = 600
    threads_per_run: int = 0  # torch threads per run; 0: torch's default
    warmup_fraction: float = 0.0  # > 0: train.warmup_steps = this fraction of each stage's steps
    overrides: list[str] = field(default_factory=list)  # every stage of every run (data.path, wandb, ...)
    slurm: SlurmSpec = field(default_factory=SlurmSpec)


@dataclass
class EvalSpec:
    """The held-out metric every run ends with (lflm_dist.eval.likelihood, as launchers/evaluate.py)."""
    data: str = ""  # text file / dir, or a shard split dir; "": data.path/valid_split of the first family
    max_chars: int = 20000
    batch_size: int = 8
    bound: BoundSettings = field(default_factory=lambda: BoundSettings(method="rk4", steps=8))


@dataclass
class ReportSpec:
    baseline: str = "ar"  # the family every other one is compared with
    bootstrap: int = 200  # resamples for the parametric fit's confidence intervals
    seed: int = 0


@dataclass
class SweepConfig:
    sweep: SweepSection = field(default_factory=SweepSection)
    eval: EvalSpec = field(default_factory=EvalSpec)
    report: ReportSpec = field(default_factory=ReportSpec)
    budgets: list[BudgetSpec] = field(default_factory=list)
    families: dict[str, FamilySpec] = field(default_factory=dict)

    def validate(self) -> "SweepConfig":
        if self.sweep.cluster not in ("auto", "slurm", "local"):
            raise ConfigError(f"sweep.cluster must be one of auto, slurm, local; got {self.sweep.cluster!r}")
        if not self.families:
            raise ConfigError("families: list at least one family")
        if not self.budgets:
            raise ConfigError("budgets: list at least one compute budget")
        for i, b in enumerate(self.budgets):
            if b.flops <= 0:
                raise ConfigError(f"budgets.{i}.flops must be > 0, got {b.flops}")
        for name, fam in self.families.items():
            where = f"families.{name}"
            if not fam.stages:
                raise ConfigError(f"{where}.stages: list at least one stage (a base run config)")
            if not fam.sizes:
                raise ConfigError(f"{where}.sizes: list at least one size")
            names = [s.name for s in fam.stages]
            if len(set(names)) != len(names):
                raise ConfigError(f"{where}.stages: stage names must be unique, got {names}")
            total = sum(s.compute_fraction for s in fam.stages)
            if abs(total - 1.0) > 1e-6 or any(s.compute_fraction <= 0 for s in fam.stages):
                raise ConfigError(f"{where}.stages: compute_fraction must be > 0 and sum to 1, got "
                                  f"{[s.compute_fraction for s in fam.stages]}")
            for j, s in enumerate(fam.stages):
                if not s.config:
                    raise ConfigError(f"{where}.stages.{j}.config: name the stage's base run config")
            for i, b in enumerate(self.budgets):
                missing = [s for s in b.sizes if s not in fam.sizes]
                if missing:
                    raise ConfigError(f"budgets.{i}.sizes names {missing}, which {where}.sizes does not define "
                                      f"(it has {list(fam.sizes)})")
        if self.report.baseline and self.report.baseline not in self.families:
            raise ConfigError(f"report.baseline={self.report.baseline!r} is not a family of this sweep "
                              f"({list(self.families)})")
        return self


def load_sweep_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> SweepConfig:
    """SweepConfig from a YAML file plus `dotted.key=value` overrides (values parsed as YAML)."""
    return from_dict(SweepConfig, read_raw(path, overrides, "sweep config"), "", "sweep config").validate()


def to_yaml(cfg: SweepConfig) -> str:
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)
