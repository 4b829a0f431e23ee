#!/usr/bin/env python
"""Compute-scaling sweeps (IsoFLOP grids) and their scaling-law report. See docs/sweeps.md.

  python launchers/sweep.py run configs/sweeps/tiny_cpu.yaml [dotted.key=value ...] [--dry-run] [--wait]
      plan (print the table: family, size, params, tokens, steps, FLOPs), then submit every run not
      yet finished with Submitit (SLURM job array, or local processes), e.g. sweep.dir=runs/sweeps/x.
      Re-running skips finished runs and resubmits failed or interrupted ones. Local sweeps are
      waited for and end with the report.
  python launchers/sweep.py status CONFIG [dotted.key=value ...]
      the state of every planned run.
  python launchers/sweep.py report SWEEP_DIR
      IsoFLOP minima, N_opt(C) / L_opt(C) power laws, the parametric L(N, D) fit with bootstrap
      intervals, plots, SWEEP_DIR/report.md.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="plan and submit a sweep")
    r.add_argument("config", help="sweep config (configs/sweeps/*.yaml)")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. sweep.dir=runs/sweeps/x")
    r.add_argument("--dry-run", action="store_true", help="print the plan and submit nothing")
    r.add_argument("--wait", action="store_true", help="SLURM: wait for the array and write the report")
    s = sub.add_parser("status", help="state of every planned run")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    rep = sub.add_parser("report", help="fit scaling laws and write SWEEP_DIR/report.md with plots")
    rep.add_argument("sweep_dir")
    rep.add_argument("--bootstrap", type=int, default=None, help="resamples (default: the sweep's report.bootstrap)")
    a, extra = p.parse_known_args(argv)  # overrides may come before or after --dry-run
    bad = [x for x in extra if "=" not in x or x.startswith("-")]
    if bad or (extra and a.cmd == "report"):
        p.error(f"unrecognized arguments: {' '.join(bad or extra)}")
    if extra:
        a.overrides += extra

    from lflm_dist.config import ConfigError
    from lflm_dist.sweeps.config import load_sweep_config
    try:
        if a.cmd == "report":
            from lflm_dist.sweeps.report import write_report
            out = write_report(a.sweep_dir, bootstrap=a.bootstrap)
            print(f"wrote {out}")
            return 0
        cfg = load_sweep_config(a.config, a.overrides)
        if a.cmd == "status":
            from lflm_dist.sweeps.plan import make_plan
            from lflm_dist.sweeps.submit import run_state
            for run in make_plan(cfg):
                print(f"{run_state(run):<12} {run.run_id}")
            return 0
        from lflm_dist.sweeps.submit import run_sweep
        states = run_sweep(cfg, dry_run=a.dry_run, wait=a.wait)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if a.dry_run:
        return 0
    if states and all(v == "finished" for v in states.values()):
        from lflm_dist.sweeps.report import write_report
        print(f"all {len(states)} runs finished; wrote {write_report(cfg.sweep.dir)}")
        return 0
    unfinished = {k: v for k, v in states.items() if v != "finished"}
    print(f"{len(unfinished)} runs not finished ({', '.join(sorted(set(unfinished.values())))}); re-run the same "
          "command to resubmit failed ones")
    return 1 if any(v in ("failed", "interrupted") for v in unfinished.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
