"""From a sweep dir's result.json files to per-family scaling laws and the comparison with the
baseline family (numbers only; lflm_dist/sweeps/report.py draws and writes them).

The loss everywhere is the held-out bits per character (result["eval"]["bpc"]); a run's N is
its last stage's trainable parameters, D the tokens of all its stages, C their training FLOPs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lflm_dist.sweeps import fit


@dataclass
class FamilyFit:
    name: str
    runs: list[dict]
    minima: list[fit.IsoMin] = field(default_factory=list)
    n_opt: fit.PowerLaw | None = None
    d_opt: fit.PowerLaw | None = None
    l_opt: fit.PowerLaw | None = None
    parametric: dict | None = None
    k_flops: float = 6.0  # C / (N D): this family's training FLOPs per parameter per token
    flags: list[str] = field(default_factory=list)

    def points(self, key: str) -> np.ndarray:
        return np.array([r[key] for r in self.runs], float)

    def frontier(self, c_grid: np.ndarray, params: dict | None = None) -> np.ndarray:
        """Parametric compute-optimal loss L*(C) on c_grid (point estimate unless `params`)."""
        return fit.compute_optimal_frontier(params or self.parametric["params"], self.k_flops, c_grid, self.n_min)[0]

    @property
    def n_min(self) -> float:
        """Smallest size a frontier may pick: a tenth of the smallest run (below it the fit is blind)."""
        return float(self.points("params").min()) / 10


def load_results(sweep_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(planned runs from plan.json, finished runs' result.json with their loss as "loss")."""
    root = Path(sweep_dir)
    plan_path = root / "plan.json"
    if not plan_path.is_file():
        raise FileNotFoundError(f"{plan_path} not found: SWEEP_DIR must be a dir written by `sweep.py run`")
    planned = json.loads(plan_path.read_text())["runs"]
    results = []
    for run in planned:  # a run's dir is SWEEP_DIR/runs/RUN_ID wherever the sweep was launched from
        path = root / "runs" / run["run_id"] / "result.json"
        if path.is_file():
            r = json.loads(path.read_text())
            results.append({**r, "loss": r["eval"]["bpc"], "result_path": str(path)})
    return planned, results


def fit_family(name: str, runs: list[dict], bootstrap: int, seed: int) -> FamilyFit:
    f = FamilyFit(name, sorted(runs, key=lambda r: (r["budget"], r["params"])))
    by_budget: dict[float, list[dict]] = {}
    for r in f.runs:
        by_budget.setdefault(r["budget"], []).append(r)
    for budget, rs in sorted(by_budget.items()):
        m = fit.isoflop_minimum(budget, [r["params"] for r in rs], [r["tokens"] for r in rs], [r["loss"] for r in rs])
        f.minima.append(m)
        f.flags += [f"IsoFLOP C={budget:.3g}: {x}" for x in m.flags]
    f.flags += rising_with_compute(f.runs)
    ok = [m for m in f.minima if m.ok]
    f.n_opt = fit.power_law([m.budget for m in ok], [m.n_opt for m in ok])
    f.d_opt = fit.power_law([m.budget for m in ok], [m.d_opt for m in ok])
    f.l_opt = fit.power_law([m.budget for m in ok], [m.l_opt for m in ok])
    f.flags += [f"N_opt(C), L_opt(C): {x}" for x in f.n_opt.flags]
    if f.runs:
        f.k_flops = float(np.median(f.points("flops") / (f.points("params") * f.points("tokens"))))
    if len(f.runs) >= 5:
        f.parametric = fit.fit_parametric(f.points("params"), f.points("tokens"), f.points("loss"),
                                          bootstrap=bootstrap, seed=seed)
        f.flags += [f"L(N, D): {x}" for x in f.parametric["flags"]]
    else:
        f.flags.append(f"L(N, D): {len(f.runs)} runs, fewer than its 5 parameters: not fitted")
    return f


def rising_with_compute(runs: list[dict]) -> list[str]:
    """Sizes whose held-out loss is higher at a larger budget: the runs are outside the regime the
    fitted laws assume (for an upper bound, its gap can grow as training goes on)."""
    flags = []
    for size in sorted({r["size"] for r in runs}):
        rs = sorted((r for r in runs if r["size"] == size), key=lambda r: r["budget"])
        worse = [(a, b) for a, b in zip(rs, rs[1:]) if b["loss"] > a["loss"]]
        if worse:
            flags.append(f"size {size}: held-out BPC rises with compute ("
                         + ", ".join(f"{a['loss']:.3f} at C={a['budget']:.2g} -> {b['loss']:.3f} at C={b['budget']:.2g}"
                                     for a, b in worse)
                         + "); the fits assume it falls (a bound's gap to the true NLL can grow with training)")
    return flags


def c_grid(fams: list[FamilyFit]) -> np.ndarray:
    """From a tenth of the smallest budget to 10^8 times the largest: where crossings are looked for."""
    budgets = [r["budget"] for f in fams for r in f.runs]
    return np.logspace(math.log10(min(budgets) / 10), math.log10(max(budgets) * 1e8), 121)


def compare(f: FamilyFit, base: FamilyFit, grid: np.ndarray, max_pairs: int = 200) -> dict:
    """Where family f's fitted loss would meet the baseline's: from the L_opt(C) power laws and from
    the parametric frontiers (point estimates, and the share of bootstrap pairs that cross with the
    5-95% range of their crossing compute)."""
    out: dict = {"family": f.name, "baseline": base.name}
    out["power_law_crossing"] = fit.power_law_crossing(f.l_opt, base.l_opt) if f.l_opt and base.l_opt else None
    largest = max(r["budget"] for r in f.runs)
    fb = {r["size"]: r["loss"] for r in f.runs if r["budget"] == largest}
    bb = {r["size"]: r["loss"] for r in base.runs if r["budget"] == largest}
    out["best_at_largest_budget"] = (largest, min(fb.values()) if fb else None, min(bb.values()) if bb else None)
    if f.parametric and base.parametric:
        lf, lb = f.frontier(grid), base.frontier(grid)
        out["frontier_crossing"] = fit.crossing(grid, lf, lb)
        out["frontier_gap_at_grid_ends"] = (float(lf[0] - lb[0]), float(lf[-1] - lb[-1]))
        pairs = list(zip(f.parametric["samples"], base.parametric["samples"]))[:max_pairs]
        cs = [fit.crossing(grid, f.frontier(grid, a), base.frontier(grid, b)) for a, b in pairs]
        hits = [c for c in cs if c is not None]
        out["bootstrap_cross_fraction"] = len(hits) / len(cs) if cs else None
        out["bootstrap_crossing_range"] = (float(np.percentile(hits, 5)), float(np.percentile(hits, 95))) if hits else None
    return out
