"""LFLM through the shared stack, added without touching the trainer, evaluation, the parallel
layer or sweeps: `launchers/pretrain.py --config configs/lflm_tiny.yaml` trains; under torchrun
2 processes with DDP, FSDP2 (its LSTM and decoder blocks as units) and DeepSpeed ZeRO-2 give the
losses of one process at the same global batch (rel 1e-5, as the other families), resume and
export; an interrupted run resumes bit-identically (the KL schedule's step counter included);
`parallel.tp=2` stops at start-up naming the family; evaluation and lm-eval score it through
the family interface."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_train import (FAMILY_CASES as CASES, FAMILY_FIRST as FIRST, FAMILY_STEPS as STEPS, ROOT,
                        cut_and_resume, first_half_then_resume, launch as launch_run, losses)

CONFIG = "configs/lflm_tiny.yaml"
TINY = ["model.seq_len=32", "model.lflm.embed_dim=32", "model.lflm.encoder_hidden=32", "model.lflm.latent_dim=8",
        "model.lflm.ode_hidden=32", "model.lflm.decoder.dim=32", "model.lflm.decoder.n_heads=2",
        "model.lflm.decoder.n_layers=2", "model.lflm.latent_tokens=2", "model.lflm.beta_steps=3",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_batches=2", "train.lr=3e-3",
        "run.wandb_mode=disabled", "sample.num_samples=1", "sample.max_new_tokens=8", "data.num_workers=1"]


def launch(data, run_dir, *extra, nproc=1, expect=0):
    return launch_run(data, run_dir, *extra, nproc=nproc, expect=expect, config=CONFIG, base=TINY)


def metric(run_dir, key):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("lflm") / "one"
    p = launch(tiny_data, run, *STEPS)
    assert "[train] lflm ode=rk4" in p.stdout and "--- sample 0" in p.stdout
    return run


def test_lflm_logs_kl_per_dim_active_units_and_anneals_beta(reference):
    rows = [json.loads(ln) for ln in (reference / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert [round(r["beta"], 6) for r in steps] == [0.0, round(1 / 3, 6), round(2 / 3, 6), 1.0]  # linear over 3
    assert all(f"kl_dim/{d:02d}" in steps[0] for d in range(8)) and "active_units" in steps[0]
    assert sum(steps[-1][f"kl_dim/{d:02d}"] for d in range(8)) == pytest.approx(steps[-1]["kl"], rel=1e-4)
    assert any("valid/recon_acc" in r for r in rows)


@pytest.mark.parametrize("name", list(CASES))
def test_lflm_strategy_matches_one_process_and_resumes(name, reference, tiny_data, tmp_path):
    run = tmp_path / name
    first_half_then_resume(launch, tiny_data, run, name)
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)
    assert metric(run, "grad_norm") == pytest.approx(metric(reference, "grad_norm"), rel=1e-4)
    assert metric(run, "beta") == metric(reference, "beta")  # the step counter is checkpointed


def test_lflm_interrupted_run_resumes_bit_identically(tiny_data, tmp_path):
    full, cut = cut_and_resume(CONFIG, TINY + STEPS, tiny_data, tmp_path)  # the checkpoint is at step 2
    assert losses(cut)[-2:] == losses(full)[-2:]
    assert metric(cut, "kl")[-2:] == metric(full, "kl")[-2:]


def test_lflm_tensor_parallel_fails_at_start_up_naming_the_family(tiny_data, tmp_path):
    p = launch(tiny_data, tmp_path / "tp", "parallel.tp=2", *FIRST, nproc=2, expect=1)  # torchrun: a worker exited 2
    assert "'lflm' model family has no tensor-parallel plan" in p.stderr
    assert not (tmp_path / "tp" / "checkpoints").exists()


def test_lflm_run_evaluates_generates_and_exports(reference, tmp_path):
    """The evaluation harness, the generate launcher's latent tools and export reach LFLM only
    through the family interface."""
    from lflm_dist.eval.likelihood import BoundSettings, evaluate_likelihood, load_eval_text
    from lflm_dist.generate import load_run
    model, cfg, tok = load_run(reference)
    data = load_eval_text(ROOT / "README.md", tok, max_chars=400)
    r = evaluate_likelihood(model, cfg, tok, data, settings=BoundSettings(draws=2))
    assert r["family"] == "lflm" and r["kind"] == "elbo_bound" and r["what"] == "upper_bound"
    assert r["tokens"] == sum(len(d) for d in data.docs) and r["bpc"] > 0
    assert r["terms_per_token"]["neg_elbo"] == pytest.approx(r["terms_per_token"]["recon"] + r["terms_per_token"]["kl"])
    assert r["mc_stderr_nll_per_token"] is not None  # two draws of z: a Monte Carlo spread
    assert model.posterior_means(torch.tensor(data.docs[:1])[:, :32]).shape == (1, 8)  # one latent per text
    k8 = evaluate_likelihood(model, cfg, tok, data, settings=BoundSettings(iwae_k=8))
    assert k8["kind"] == "iwae_bound" and k8["nll_per_token"] < r["nll_per_token"]

    gen = subprocess.run([sys.executable, str(ROOT / "launchers/generate.py"), "--run", str(reference),
                          "--interpolate", "ROMEO. I will go", "JULIET. Come, night", "--points", "3",
                          "--arithmetic", "a b", "b", "c", "--num-samples", "1"],
                         capture_output=True, text=True, cwd=ROOT, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert "[0.00]" in gen.stdout and "[1.00]" in gen.stdout and "z('a b') - z('b') + z('c')" in gen.stdout

    sys.path.insert(0, str(ROOT / "launchers"))
    from export import export
    out = export(reference, tmp_path / "export")
    assert sorted(f.name for f in out.iterdir()) == ["config.yaml", "model.safetensors", "tokenizer.json"]
    exported, _, _ = load_run(out)
    x = torch.tensor([data.docs[0][:32]])
    torch.testing.assert_close(exported.nll_bound(x, generator=torch.Generator().manual_seed(0)).nll,
                               model.nll_bound(x, generator=torch.Generator().manual_seed(0)).nll)
