"""`sweep.py report SWEEP_DIR`: scaling-law fits per family, the comparison with the baseline,
PNG plots and SWEEP_DIR/report.md. Training losses are drawn one family per figure: their
objectives differ, so only the held-out bits per character is compared across families."""
from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lflm_dist.sweeps.analysis import FamilyFit, c_grid, compare, fit_family, load_results  # noqa: E402
from lflm_dist.sweeps.config import load_sweep_config  # noqa: E402

METRIC = ("held-out bits per character (BPC) of the sweep's fixed validation text (`eval_text/`), scored by "
          "`lflm_dist.eval.likelihood.evaluate_likelihood` as `launchers/evaluate.py` does: the exact NLL for "
          "autoregressive families, an upper bound (-ELBO; the prior's log-density by its probability-flow ODE) "
          "for latent families. A latent family's true BPC is at most what is shown.")


def write_report(sweep_dir: str | Path, bootstrap: int | None = None) -> Path:
    root = Path(sweep_dir)
    cfg = load_sweep_config(root / "sweep.yaml")
    planned, results = load_results(root)
    if not results:
        raise ValueError(f"{root}: no finished runs (no runs/*/*/*/result.json) to report on")
    nboot = cfg.report.bootstrap if bootstrap is None else bootstrap
    families = [f for f in cfg.families if any(r["family"] == f for r in results)]
    fits = {f: fit_family(f, [r for r in results if r["family"] == f], nboot, cfg.report.seed) for f in families}
    base = fits.get(cfg.report.baseline)
    grid = c_grid(list(fits.values()))
    comps = [compare(f, base, grid) for f in fits.values() if base is not None and f is not base]
    plots = [plot_bpc_vs_flops(fits, root), plot_isoflop(fits, root), plot_frontiers(fits, grid, root)]
    if base is not None:
        plots.append(plot_vs_baseline(fits, base, grid, comps, root))
    plots += [plot_train_loss(f, root) for f in fits.values()]
    text = render(cfg, root, planned, results, fits, comps, [p for p in plots if p is not None], grid)
    out = root / "report.md"
    out.write_text(text)
    (root / "report.json").write_text(json.dumps(summary(fits, comps), indent=1, default=float) + "\n")
    return out


# ----------------------------------------------------------------------------- plots
def _panels(n: int, w: float = 5.0, h: float = 3.8):
    fig, axes = plt.subplots(1, n, figsize=(w * n, h), squeeze=False)
    return fig, list(axes[0])


def _save(fig, path: Path) -> Path:
    for ax in fig.axes:  # log axes spanning under a decade label minor ticks too, over each other
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_bpc_vs_flops(fits: dict[str, FamilyFit], root: Path) -> Path:
    fig, axes = _panels(len(fits))
    for ax, f in zip(axes, fits.values()):
        sc = ax.scatter(f.points("flops"), f.points("loss"), c=np.log10(f.points("params")), cmap="viridis", s=30)
        fig.colorbar(sc, ax=ax, label="log10 params")
        ok = [m for m in f.minima if m.ok]
        if ok:
            ax.scatter([m.budget for m in ok], [m.l_opt for m in ok], marker="*", s=160, c="red", label="IsoFLOP minimum")
        cs = np.logspace(math.log10(f.points("flops").min() / 2), math.log10(f.points("flops").max() * 2), 50)
        if f.l_opt and f.l_opt.k is not None:
            ax.plot(cs, f.l_opt(cs), "r--", lw=1, label=f"L_opt ∝ C^{f.l_opt.exponent:.3f}")
        if f.parametric:
            ax.plot(cs, f.frontier(cs), "k:", lw=1, label="L(N, D) frontier")
        ax.set(xscale="log", xlabel="training FLOPs", ylabel="held-out bits / char", title=f.name)
        ax.legend(fontsize=7)
    return _save(fig, root / "bpc_vs_flops.png")


def plot_isoflop(fits: dict[str, FamilyFit], root: Path) -> Path:
    fig, axes = _panels(len(fits))
    for ax, f in zip(axes, fits.values()):
        budgets = sorted({r["budget"] for r in f.runs})
        colors = plt.cm.plasma(np.linspace(0, 0.85, max(1, len(budgets))))
        for color, b in zip(colors, budgets):
            rs = [r for r in f.runs if r["budget"] == b]
            n = np.array([r["params"] for r in rs], float)
            ax.plot(n, [r["loss"] for r in rs], "o", color=color, label=f"C={b:.3g}")
            m = next(m for m in f.minima if m.budget == b)
            if m.coef is not None:
                xs = np.linspace(np.log(n.min()) - 0.3, np.log(n.max()) + 0.3, 60)
                ax.plot(np.exp(xs), np.polyval(m.coef, xs), "-", color=color, lw=1)
            if m.ok:
                ax.plot(m.n_opt, m.l_opt, "*", color=color, ms=13, mec="k")
        ax.set(xscale="log", xlabel="parameters N", ylabel="held-out bits / char", title=f"{f.name}: IsoFLOP curves")
        ax.legend(fontsize=7)
    return _save(fig, root / "isoflop.png")


def plot_frontiers(fits: dict[str, FamilyFit], grid: np.ndarray, root: Path) -> Path:
    """Left: N_opt(C) of every family (IsoFLOP minima, their power law, the parametric fit's N*(C)).
    Right: each family's fitted loss frontier with its bootstrap band."""
    from lflm_dist.sweeps.fit import compute_optimal_frontier
    fig, (ax_n, ax_l) = _panels(2, 6.0, 4.2)
    for i, f in enumerate(fits.values()):
        color = f"C{i}"
        ok = [m for m in f.minima if m.ok]
        ax_n.plot([m.budget for m in ok], [m.n_opt for m in ok], "o", color=color, label=f"{f.name} IsoFLOP minima")
        if f.n_opt and f.n_opt.k is not None:
            ax_n.plot(grid, f.n_opt(grid), "-", color=color, lw=1, label=f"{f.name}: N_opt ∝ C^{f.n_opt.exponent:.3f}")
        if f.parametric:
            _, n_star, _ = compute_optimal_frontier(f.parametric["params"], f.k_flops, grid, f.n_min)
            ax_n.plot(grid, n_star, ":", color=color, lw=1, label=f"{f.name}: from L(N, D)")
            ax_l.plot(grid, f.frontier(grid), "-", color=color, label=f"{f.name} L*(C)")
            band = np.array([f.frontier(grid, s) for s in f.parametric["samples"][:100]])
            if len(band):
                ax_l.fill_between(grid, np.percentile(band, 5, 0), np.percentile(band, 95, 0), color=color, alpha=0.15)
        ax_l.plot(f.points("flops"), f.points("loss"), ".", color=color, alpha=0.6)
    ax_n.set(xscale="log", yscale="log", xlabel="training FLOPs C", ylabel="N_opt", title="compute-optimal size")
    ax_l.set(xscale="log", xlabel="training FLOPs C", ylabel="held-out bits / char",
             title="L(N, D) compute-optimal frontier (5-95% bootstrap)")
    ax_n.legend(fontsize=6)
    ax_l.legend(fontsize=7)
    return _save(fig, root / "frontiers.png")


def plot_vs_baseline(fits: dict[str, FamilyFit], base: FamilyFit, grid: np.ndarray, comps: list[dict],
                     root: Path) -> Path:
    fig, (ax,) = _panels(1, 7.5, 4.8)
    for i, f in enumerate(fits.values()):
        style = dict(color="k", lw=2) if f is base else dict(color=f"C{i}", lw=1.2)
        ok = [m for m in f.minima if m.ok]
        ax.plot(f.points("flops"), f.points("loss"), ".", alpha=0.5, color=style["color"])
        if ok:
            ax.plot([m.budget for m in ok], [m.l_opt for m in ok], "*", ms=10, color=style["color"])
        if f.l_opt and f.l_opt.k is not None:
            ax.plot(grid, f.l_opt(grid), "--", **style, label=f"{f.name}: L_opt(C) power law")
        if f.parametric:
            ax.plot(grid, f.frontier(grid), "-", **style, label=f"{f.name}: L(N, D) frontier")
    for c in comps:
        for key, ls in (("power_law_crossing", "--"), ("frontier_crossing", "-")):
            x = c.get(key)
            if x is not None and grid[0] <= x <= grid[-1]:
                ax.axvline(x, color="gray", ls=ls, lw=0.8)
                ax.annotate(f"{c['family']} = {base.name}\nat {x:.2g}", (x, ax.get_ylim()[1]), fontsize=7,
                            va="top", rotation=90)
    ax.set(xscale="log", xlabel="training FLOPs C", ylabel="held-out bits / char (latent families: upper bound)",
           title=f"every family against {base.name}")
    ax.legend(fontsize=7)
    return _save(fig, root / f"vs_{base.name}.png")


def plot_train_loss(f: FamilyFit, root: Path) -> Path | None:
    """Training loss per step of each run, one panel per stage (this family's own objective)."""
    stages = [s["name"] for s in f.runs[0]["stages"]]
    fig, axes = _panels(len(stages))
    budgets = sorted({r["budget"] for r in f.runs})
    for ax, name in zip(axes, stages):
        for r in f.runs:
            st = next(s for s in r["stages"] if s["name"] == name)
            path = root / "runs" / r["run_id"] / name / "metrics.jsonl"
            if not path.is_file():
                continue
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            pts = [(x["step"] * st["tokens_per_step"], x["loss"]) for x in rows if "loss" in x]
            if pts:
                ax.plot(*zip(*pts), lw=0.8, color=plt.cm.plasma(0.85 * budgets.index(r["budget"]) / max(1, len(budgets) - 1)),
                        label=f"{r['size']} C={r['budget']:.2g}")
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="training loss", title=f"{f.name} / {name}")
        ax.legend(fontsize=6)
    return _save(fig, root / f"train_loss_{f.name}.png")


# ----------------------------------------------------------------------------- markdown
def _g(x, fmt=".4g") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def render(cfg, root: Path, planned, results, fits, comps, plots, grid) -> str:
    text_meta = json.loads((root / "eval_text.json").read_text()) if (root / "eval_text.json").is_file() else {}
    L = [f"# Scaling sweep `{cfg.sweep.name}`", "",
         f"**Metric**: {METRIC}", "",
         f"Held-out text: {text_meta.get('chars', '?')} characters of `{text_meta.get('source', '?')}` "
         f"(sha256 {str(text_meta.get('sha256', '?'))[:12]}). N = trainable parameters of the evaluated model, "
         "D = training tokens of all stages, C = their training FLOPs (each stage's `flops_per_token()`).", "",
         f"{len(results)} of {len(planned)} planned runs finished."]
    missing = sorted({r["run_id"] for r in planned} - {r["run_id"] for r in results})
    if missing:
        L.append(f"Not finished (left out of every fit): {', '.join(missing)}.")
    L += ["", "## Runs", "", "| family | size | budget C | N | D (tokens) | C (actual) | held-out BPC | estimator |",
          "|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["family"], r["budget"], r["params"])):
        bound = "≤ " if r["eval"]["is_upper_bound"] else ""
        L.append(f"| {r['family']} | {r['size']} | {r['budget']:.3g} | {r['params']:,} | {r['tokens']:.4g} | "
                 f"{r['flops']:.4g} | {bound}{r['loss']:.4f} | {r['eval']['kind']} |")
    for f in fits.values():
        L += ["", f"## {f.name}", "", "IsoFLOP minima (parabola of BPC in ln N per budget):", "",
              "| budget C | N_opt | D_opt | L_opt (BPC) | caveats |", "|---|---|---|---|---|"]
        for m in f.minima:
            L.append(f"| {m.budget:.3g} | {_g(m.n_opt)} | {_g(m.d_opt)} | {_g(m.l_opt)} | {'; '.join(m.flags) or 'ok'} |")
        L.append("")
        for label, pl in (("N_opt(C)", f.n_opt), ("D_opt(C)", f.d_opt), ("L_opt(C)", f.l_opt)):
            if pl and pl.k is not None:
                se = f" ± {pl.exponent_stderr:.3f}" if pl.exponent_stderr is not None else ""
                L.append(f"- {label} = {pl.k:.4g} · C^({pl.exponent:.4f}{se})  ({pl.n} budgets)")
            else:
                L.append(f"- {label}: not fitted ({'; '.join(pl.flags) if pl else 'no minima'})")
        L.append(f"- FLOPs per parameter per token C/(N·D): {f.k_flops:.3g}")
        if f.parametric:
            p, ci = f.parametric["params"], f.parametric["ci"]
            L += ["", f"Parametric fit L(N, D) = E + A/N^α + B/D^β (Huber δ=1e-3 on ln L, {f.parametric['n']} runs, "
                  f"{f.parametric['bootstrap']} bootstrap resamples; rms residual of ln L "
                  f"{f.parametric['rms_log_residual']:.4f}):", "", "| parameter | estimate | 95% bootstrap interval |",
                  "|---|---|---|"]
            for k, name in (("E", "E (BPC)"), ("A", "A"), ("alpha", "α"), ("B", "B"), ("beta", "β"),
                            ("a_nopt", "a = β/(α+β), N_opt ∝ C^a")):
                lo, hi = ci.get(k, (None, None))
                L.append(f"| {name} | {p[k]:.4g} | [{_g(lo)}, {_g(hi)}] |")
        L += ["", "Where this family's fits are poorly constrained:", ""]
        L += [f"- {x}" for x in f.flags] or ["- nothing flagged"]
    if comps:
        base = comps[0]["baseline"]
        L += ["", f"## Against {base}", "",
              f"Compute C at which each family's fitted held-out BPC would equal {base}'s (searched over "
              f"[{grid[0]:.2g}, {grid[-1]:.2g}] FLOPs).", "",
              f"| family | best BPC at largest budget (family / {base}) | crossing from L_opt power laws | "
              "crossing of L(N, D) frontiers | bootstrap pairs that cross (5-95% of C) |", "|---|---|---|---|---|"]
        for c in comps:
            b, lf, lb = c["best_at_largest_budget"]
            frac = c.get("bootstrap_cross_fraction")
            rng = c.get("bootstrap_crossing_range")
            boot = "–" if frac is None else f"{frac:.0%}" + (f" ({rng[0]:.2g} – {rng[1]:.2g})" if rng else "")
            L.append(f"| {c['family']} | {_g(lf)} / {_g(lb)} at C={b:.3g} | {_g(c.get('power_law_crossing'), '.3g')} | "
                     f"{_g(c.get('frontier_crossing'), '.3g') if 'frontier_crossing' in c else 'not fitted'} | {boot} |")
        L += ["", "A crossing far beyond the largest budget is an extrapolation of the fits above, no better "
              "constrained than they are; '–' means the fitted curves do not meet in the searched range."]
    L += ["", "## Plots", ""]
    L += [f"![{p.stem}]({p.name})" for p in plots]
    L += ["", "Training losses (`train_loss_*.png`) are each family's own objective, drawn per family and "
          "never compared across families.", ""]
    return "\n".join(L)


def summary(fits: dict[str, FamilyFit], comps: list[dict]) -> dict:
    out = {}
    for name, f in fits.items():
        out[name] = {
            "minima": [{"budget": m.budget, "n_opt": m.n_opt, "d_opt": m.d_opt, "l_opt": m.l_opt, "flags": m.flags}
                       for m in f.minima],
            "n_opt": vars(f.n_opt) if f.n_opt else None, "l_opt": vars(f.l_opt) if f.l_opt else None,
            "parametric": {k: v for k, v in (f.parametric or {}).items() if k != "samples"} or None,
            "k_flops": f.k_flops, "flags": f.flags}
    return {"families": out, "comparisons": comps}
