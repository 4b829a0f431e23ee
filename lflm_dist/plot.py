"""Plot loss terms and throughput of one or more runs:

    python -m lflm_dist.plot RUN_DIR [RUN_DIR ...] [--out plot.png]

One panel per metric (every loss term the runs logged, validation points as markers, then
tokens/s); one line per run.
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

NOT_TERMS = {"step", "lr", "grad_norm", "step_time_s", "tokens_per_s", "flops_per_s", "peak_rss_mb", "mfu", "peak_mem_mb"}


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: pass run dirs written by launchers/pretrain.py")
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def plot_runs(run_dirs: list[str], out: str | Path) -> Path:
    runs = {str(d): read_metrics(d) for d in run_dirs}
    terms = sorted({k for rows in runs.values() for r in rows for k in r
                    if k not in NOT_TERMS and not k.startswith("valid/")})
    panels = terms + ["tokens_per_s"]
    cols = min(3, len(panels))
    rows_n = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(5 * cols, 3.4 * rows_n), squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for name, rows in runs.items():
            pts = [(r["step"], r[key]) for r in rows if key in r]
            if pts:
                line, = ax.plot(*zip(*pts), label=Path(name).name, lw=1.2)
                val = [(r["step"], r[f"valid/{key}"]) for r in rows if f"valid/{key}" in r]
                if val:
                    ax.plot(*zip(*val), "o", color=line.get_color(), ms=5, label=f"{Path(name).name} (valid)")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key in ("loss", "recon", "fm", "nll", "kl", "kl_ref") and all(
                r[key] > 0 for rows in runs.values() for r in rows if key in r):
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run dirs holding metrics.jsonl")
    p.add_argument("--out", default=None, help="PNG path (default: <first run>/metrics.png)")
    a = p.parse_args(argv)
    out = plot_runs(a.runs, a.out or Path(a.runs[0]) / "metrics.png")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
