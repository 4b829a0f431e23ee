"""Compute-scaling sweeps: the IsoFLOP planner on the real models, the scaling-law fits on
synthetic losses with a known answer, and a small real sweep through Submitit's local executor."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lflm_dist.config import ConfigError, load_config
from lflm_dist.models.registry import build_model
from lflm_dist.sweeps import fit
from lflm_dist.sweeps.config import load_sweep_config
from lflm_dist.sweeps.plan import make_plan

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "sweeps" / "tiny_cpu.yaml"
TRUTH = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}  # Chinchilla's fit


def synthetic(noise: float, seed: int = 0, budgets=(1e17, 1e18, 1e19, 1e20, 1e21), spread: float = 2.5):
    """Losses from TRUTH on an IsoFLOP grid (C = 6 N D), 7 sizes per budget around the optimum,
    with multiplicative log-normal noise."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in budgets:
        for f in np.exp(np.linspace(-spread, spread, 7)):
            n = 0.09 * c ** 0.5 * f
            d = c / (6 * n)
            rows.append((c, n, d, float(fit.predict(TRUTH, n, d)) * math.exp(rng.normal(0, noise))))
    return rows


def analytic_nopt(c: float) -> float:
    a, b = TRUTH["alpha"], TRUTH["beta"]
    g = (a * TRUTH["A"] / (b * TRUTH["B"])) ** (1 / (a + b))
    return g * (c / 6) ** (b / (a + b))


# ----------------------------------------------------------------------------- config and plan
def test_sweep_config_errors():
    with pytest.raises(ConfigError, match="unknown sweep config key sweep.dirr"):
        load_sweep_config(TINY, ["sweep.dirr=x"])
    with pytest.raises(ConfigError, match="budgets.0.sizes"):
        load_sweep_config(TINY, ["budgets=[{flops: 1e12, sizes: [xl]}]"])
    with pytest.raises(ConfigError, match="sum to 1"):
        load_sweep_config(TINY, ["families.cola.stages.0.compute_fraction=0.5"])


def test_plan_gives_equal_flops_per_budget(tiny_data, tmp_path):
    cfg = load_sweep_config(TINY, [f"sweep.dir={tmp_path}", f"sweep.overrides=[data.path={tiny_data}]"])
    runs = make_plan(cfg)
    assert {r.family for r in runs} == {"cola", "ar"} and len(runs) == 12
    for r in runs:
        # rounding each stage to whole steps moves it by at most half a step's FLOPs
        slack = sum(0.5 * s.flops_per_token * s.tokens_per_step for s in r.stages)
        assert abs(r.flops - r.budget) <= slack + 1e-6 * r.budget, r.run_id
        for s, spec in zip(r.stages, cfg.families[r.family].stages):
            assert abs(s.flops - spec.compute_fraction * r.budget) <= 0.5 * s.flops_per_token * s.tokens_per_step + 1
    cola = next(r for r in runs if r.family == "cola" and r.size == "l")
    assert [s.name for s in cola.stages] == ["vae", "joint"]
    assert f"model.cola.ref_checkpoint={cola.stages[0].run_dir}" in cola.stages[1].overrides
    # the planner's cost is the model's own flops_per_token(), built from the stage's final overrides
    c = load_config(cola.stages[1].config, cola.stages[1].overrides)
    c.model.vocab_size = 384
    assert build_model(c.model, device="meta").flops_per_token() == cola.stages[1].flops_per_token
    # bigger models get fewer tokens at the same budget
    ar = sorted((r for r in runs if r.family == "ar" and r.budget == runs[0].budget), key=lambda r: r.params)
    assert [r.tokens for r in ar] == sorted((r.tokens for r in ar), reverse=True)


def test_cluster_grid_plans_and_trains_each_stage_with_its_own_config(tmp_path):
    """configs/sweeps/cola_scaling.yaml plans; Cola's stage 1 is the VAE config with its own KL
    weight (not stage 2's beta, which weighs -H(q))."""
    cfg = load_sweep_config(ROOT / "configs/sweeps/cola_scaling.yaml", [f"sweep.dir={tmp_path}"])
    runs = make_plan(cfg)
    stage1 = cfg.families["cola"].stages[0]
    c1 = load_config(ROOT / stage1.config, stage1.overrides)
    assert c1.model.cola.stage == 1 and c1.model.vae.beta == load_config(ROOT / "configs/cola_2b_vae.yaml").model.vae.beta
    assert {r.family for r in runs} == {"cola", "ar"} and all(r.stages[0].flops > 0 for r in runs)


def test_dry_run_prints_the_plan(tiny_data, tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "launchers" / "sweep.py"), "run", str(TINY), "--dry-run",
                          f"sweep.dir={tmp_path / 'sw'}", f"sweep.overrides=[data.path={tiny_data}]"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    head = out.stdout.splitlines()[0].split()
    assert head[:7] == ["family", "size", "budget", "params", "tokens", "steps", "FLOPs"]
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing


# ----------------------------------------------------------------------------- fits
def test_parametric_fit_recovers_known_law():
    rows = synthetic(noise=0.01)
    _, n, d, loss = map(list, zip(*rows))
    r = fit.fit_parametric(n, d, loss, bootstrap=60, seed=0)
    p, ci = r["params"], r["ci"]
    for k in ("E", "alpha", "beta"):
        assert ci[k][0] <= TRUTH[k] <= ci[k][1], (k, p[k], ci[k])
    assert abs(p["alpha"] - TRUTH["alpha"]) < 0.05 and abs(p["beta"] - TRUTH["beta"]) < 0.05
    assert abs(p["E"] - TRUTH["E"]) < 0.15
    a = TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])
    assert ci["a_nopt"][0] <= a <= ci["a_nopt"][1]


def test_isoflop_minima_recover_nopt_and_flag_edges():
    rows = synthetic(noise=0.0)
    minima = []
    for c in sorted({r[0] for r in rows}):
        _, n, d, loss = zip(*[r for r in rows if r[0] == c])
        m = fit.isoflop_minimum(c, n, d, loss)
        assert m.ok and not m.flags
        assert abs(math.log(m.n_opt / analytic_nopt(c))) < 0.05  # a parabola in ln N: within 5%
        minima.append(m)
    law = fit.power_law([m.budget for m in minima], [m.n_opt for m in minima])
    assert abs(law.exponent - TRUTH["beta"] / (TRUTH["alpha"] + TRUTH["beta"])) < 0.01
    # sizes all above the optimum: the minimum is at the grid's edge and the report must say so
    c = 1e19
    n = [analytic_nopt(c) * f for f in (3, 6, 12, 24)]
    m = fit.isoflop_minimum(c, n, [c / (6 * x) for x in n], [fit.predict(TRUTH, x, c / (6 * x)) for x in n])
    assert any("edge" in f for f in m.flags)
    assert "parabola needs at least 3" in fit.isoflop_minimum(c, n[:2], [1, 2], [3.0, 2.9]).flags[0]


# ----------------------------------------------------------------------------- a real sweep
def test_small_sweep_runs_reports_and_resumes(tiny_data, tmp_path):
    from lflm_dist.sweeps.report import write_report
    from lflm_dist.sweeps.submit import run_state, run_sweep

    sweep_dir = tmp_path / "sweep"
    common = (f"[run.wandb_mode=disabled, data.path={tiny_data}, data.num_workers=0, model.seq_len=32, "
              "train.global_batch_size=8, train.eval_batches=1, sample.num_samples=0, train.ckpt_every=1000, "
              "model.vae.encoder.n_layers=1, model.vae.decoder.n_layers=1, model.dit.net.n_layers=1]")
    overrides = [
        f"sweep.dir={sweep_dir}", f"sweep.overrides={common}", "sweep.local_parallel=2", "sweep.threads_per_run=1",
        "budgets=[{flops: 6e8}, {flops: 1.2e9}]", "eval.max_chars=1500", "eval.batch_size=32",
        "report.bootstrap=10",
        "families.ar.sizes={s: [model.ar.net.dim=16, model.ar.net.n_layers=1], "
        "m: [model.ar.net.dim=24, model.ar.net.n_layers=1], l: [model.ar.net.dim=32, model.ar.net.n_layers=2]}",
        "families.cola.sizes={s: [model.vae.encoder.dim=16, model.vae.decoder.dim=16, model.dit.net.dim=16], "
        "m: [model.vae.encoder.dim=24, model.vae.decoder.dim=24, model.dit.net.dim=24], "
        "l: [model.vae.encoder.dim=32, model.vae.decoder.dim=32, model.dit.net.dim=32]}",
    ]
    cfg = load_sweep_config(TINY, overrides)
    cfg.sweep.cluster = "local"
    log: list[str] = []
    states = run_sweep(cfg, log=log.append)
    assert set(states.values()) == {"finished"}, (states, log)
    results = sorted(sweep_dir.glob("runs/*/*/*/result.json"))
    assert len(results) == 12
    for p in results:
        r = json.loads(p.read_text())
        assert math.isfinite(r["eval"]["bpc"]) and r["eval"]["chars"] == 1500
        assert r["eval"]["is_upper_bound"] == (r["family"] == "cola")
        assert abs(r["flops"] - r["budget"]) <= sum(0.5 * s["flops"] / s["steps"] for s in r["stages"]) + 1
    report = write_report(sweep_dir)
    text = report.read_text()
    assert "## cola" in text and "## ar" in text and "## Against ar" in text and "bits per character" in text
    for png in ("bpc_vs_flops", "isoflop", "frontiers", "vs_ar", "train_loss_cola", "train_loss_ar"):
        path = sweep_dir / f"{png}.png"
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", png
        assert f"]({png}.png)" in text

    # re-running skips every finished run: nothing is submitted, no result is rewritten
    mtimes = {p: p.stat().st_mtime_ns for p in results}
    log.clear()
    assert set(run_sweep(cfg, log=log.append).values()) == {"finished"}
    assert any("submitting 0" in x for x in log)
    assert {p: p.stat().st_mtime_ns for p in results} == mtimes

    # a failed run (no result, status failed) is resubmitted, and only it; its finished stages are kept
    victim = next(p for p in results if "/cola/" in str(p))
    victim.unlink()
    status = victim.parent / "status.json"
    status.write_text(json.dumps({**json.loads(status.read_text()), "state": "failed"}))
    plan = {r.run_id: r for r in make_plan(cfg)}
    assert run_state(plan[str(victim.parent.relative_to(sweep_dir / "runs"))]) == "failed"
    log.clear()
    assert set(run_sweep(cfg, log=log.append).values()) == {"finished"}
    assert any("submitting 1" in x for x in log) and victim.is_file()
    assert {p: p.stat().st_mtime_ns for p in results if p != victim} == {k: v for k, v in mtimes.items() if k != victim}
