"""TarFlowLM through the shared stack (added without touching the trainer, evaluation, the parallel
layer or sweeps): under torchrun 2 processes with DDP, FSDP2 and DeepSpeed ZeRO-2 give the losses of one process at
the same global batch and resume; an interrupted run resumes bit-identically; progressive training
loads the previous stage's codebook and first block, keeps them frozen and trains the new block;
`parallel.tp=2` stops at start-up naming the family; evaluation reports the exact-for-its-draw
-ELBO as an upper bound, and export round-trips."""
import json

import pytest
import torch
from safetensors.torch import load_file

from lflm_dist.train.checkpoint import latest_checkpoint
from test_train import (FAMILY_CASES as CASES, FAMILY_FIRST as FIRST, FAMILY_STEPS as STEPS, ROOT,
                        cut_and_resume, first_half_then_resume, launch as launch_run, losses)

CONFIG = "configs/tarflow_bpe.yaml"
BLOCKS = json.dumps([{"coupling": "rosenblatt", "n_layers": 1}, {"coupling": "mix1", "n_layers": 1, "components": 4}])
TINY = ["model.seq_len=32", "model.tarflow.latent_dim=4", "model.tarflow.dim=32", "model.tarflow.n_heads=2",
        f"model.tarflow.blocks={BLOCKS}", "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_batches=2",
        "train.lr=3e-3", "run.wandb_mode=disabled", "sample.num_samples=1", "sample.max_new_tokens=6",
        "data.num_workers=1"]


def launch(data, run_dir, *extra, nproc=1, expect=0):
    return launch_run(data, run_dir, *extra, nproc=nproc, expect=expect, config=CONFIG, base=TINY)


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("tarflow") / "one"
    p = launch(tiny_data, run, *STEPS)
    assert "[train] tarflow flows=rosenblatt(1)+mix1(1) patch=1" in p.stdout and "--- sample 0" in p.stdout
    return run


@pytest.mark.parametrize("name", list(CASES))
def test_tarflow_strategy_matches_one_process_and_resumes(name, reference, tiny_data, tmp_path):
    run = tmp_path / name
    first_half_then_resume(launch, tiny_data, run, name)
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)


def test_tarflow_interrupted_run_resumes_bit_identically(tiny_data, tmp_path):
    full, cut = cut_and_resume(CONFIG, TINY + STEPS, tiny_data, tmp_path)  # the checkpoint is at step 2
    assert losses(cut) == losses(full) and len(losses(cut)) == 4


def test_progressive_stage_trains_only_the_new_block(reference, tiny_data, tmp_path):
    """Stage 2 adds a block: the codebook and block 0 come from stage 1 (`reference`, trained with
    both blocks; only its first is taken) and do not move; the new block does."""
    run = tmp_path / "stage2"
    p = launch(tiny_data, run, *STEPS, "model.tarflow.frozen_blocks=1", f"model.tarflow.init_from={reference}")
    assert "frozen=1" in p.stdout
    first = load_file(str(latest_checkpoint(reference) / "model.safetensors"))
    after = load_file(str(latest_checkpoint(run) / "model.safetensors"))
    frozen = [k for k in after if k.startswith(("codebook.", "blocks.0."))]
    assert frozen and all(torch.equal(after[k], first[k]) for k in frozen)
    trained = [k for k in after if k.startswith("blocks.1.") and k.endswith("weight")]
    assert any(not torch.equal(after[k], first[k]) for k in trained)


def test_tarflow_tensor_parallel_fails_at_start_up_naming_the_family(tiny_data, tmp_path):
    p = launch(tiny_data, tmp_path / "tp", "parallel.tp=2", *FIRST, nproc=2, expect=1)
    assert "'tarflow' model family has no tensor-parallel plan" in p.stderr
    assert not (tmp_path / "tp" / "checkpoints").exists()


def test_tarflow_run_evaluates_and_exports(reference, tmp_path):
    from lflm_dist.eval.likelihood import BoundSettings, evaluate_likelihood, load_eval_text
    from lflm_dist.generate import load_run
    model, cfg, tok = load_run(reference)
    data = load_eval_text(ROOT / "README.md", tok, max_chars=400)
    r = evaluate_likelihood(model, cfg, tok, data, settings=BoundSettings(draws=2))
    assert r["family"] == "tarflow" and r["kind"] == "elbo_bound" and r["what"] == "upper_bound"
    assert r["tokens"] == sum(len(d) for d in data.docs) and r["bpc"] > 0
    t = r["terms_per_token"]
    assert t["neg_elbo"] == pytest.approx(t["recon"] + t["neg_entropy"] + t["neg_log_prior"], rel=1e-5)
    k4 = evaluate_likelihood(model, cfg, tok, data, settings=BoundSettings(iwae_k=4))
    assert k4["kind"] == "iwae_bound" and k4["nll_per_token"] < r["nll_per_token"]

    import os
    import subprocess
    import sys

    def generate(*args):
        return subprocess.run([sys.executable, str(ROOT / "launchers/generate.py"), "--run", str(reference), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    n = len(tok.encode(" king"))
    new = next(w for w in (" duke", " lord", " queen", " son", " man", " king") if len(tok.encode(w)) == n)
    gen = generate("--edit", "ROMEO. I will go to the king and say", " king", new, "--reconstruct", "ROMEO.")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert f"[edited] 'ROMEO. I will go to the{new}" in gen.stdout and "[out]" in gen.stdout
    longer = next(w for w in (" duke", " lord", " queen", " son", " man") if len(tok.encode(w)) != n)
    bad = generate("--edit", "go to the king", " king", longer)
    assert bad.returncode == 2 and "--edit keeps the text's length" in bad.stderr
    bad = generate("--interpolate", "a", "b")
    assert bad.returncode == 2 and "no single latent per text" in bad.stderr

    sys.path.insert(0, str(ROOT / "launchers"))
    from export import export
    out = export(reference, tmp_path / "export")
    exported, _, _ = load_run(out)
    x = torch.tensor([data.docs[0][:32]])
    torch.testing.assert_close(exported.nll_bound(x, generator=torch.Generator().manual_seed(0)).nll,
                               model.nll_bound(x, generator=torch.Generator().manual_seed(0)).nll)
