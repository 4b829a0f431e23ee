"""The training loop end to end on real shards: exact resume, DDP (2 gloo processes) equal to
one process at the same global batch, gradient accumulation, errors, logging and plots."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lflm_dist.config import load_config
from lflm_dist.train.checkpoint import latest_checkpoint
from lflm_dist.train.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["model.seq_len=32", "model.vae.encoder.dim=32", "model.vae.decoder.dim=32", "model.vae.encoder.n_heads=2",
        "model.vae.decoder.n_heads=2", "model.dit.net.dim=32", "model.dit.net.n_heads=2", "model.dit.net.n_layers=2",
        "model.cola.lambda_ref=0", "model.cola.ref_checkpoint=", "model.cola.latent_stats=track", "model.vae.mask_prob=0.15",
        "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_batches=2", "train.lr=3e-3",
        "run.wandb_mode=disabled", "sample.num_samples=0", "data.num_workers=1"]


def overrides(data, run_dir, *extra, base=TINY):
    return base + [f"data.path={data}", f"run.dir={run_dir}", *extra]


def losses(run_dir):
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r]


def train_inproc(data, run_dir, *extra, stop_at=None):
    cfg = load_config(ROOT / "configs/cola_tiny.yaml", overrides(data, run_dir, *extra))
    return Trainer(cfg).fit(stop_at=stop_at)


# a family through the stack: 2 processes for the first 2 steps, then resumed to 4 (global batch 8)
FAMILY_STEPS = ["train.max_steps=4", "train.ckpt_every=2"]
FAMILY_FIRST = ["train.max_steps=2", "train.ckpt_every=2"]
FAMILY_CASES = {  # name: (overrides, processes, processes for the resumed half)
    "ddp": ([], 2, 2),
    "fsdp2": (["parallel.strategy=fsdp2"], 2, 1),  # DCP reshards 2 -> 1 process
    "zero2": (["parallel.strategy=deepspeed", "parallel.zero_stage=2"], 2, 2),
}


def first_half_then_resume(launch_family, data, run, name):
    """Steps 1-2 under FAMILY_CASES[name], then the same command resumed to step 4."""
    extra, nproc, resume_nproc = FAMILY_CASES[name]
    launch_family(data, run, *extra, *FAMILY_FIRST, nproc=nproc)
    p = launch_family(data, run, *extra, *FAMILY_STEPS, nproc=resume_nproc)
    assert "[resume] from" in p.stdout and "at step 2" in p.stdout
    return p


def cut_and_resume(config, base, data, tmp_path, stop_at=3):
    """Train `full` uninterrupted and `cut` stopped after step `stop_at` (as a crash would, past its
    last checkpoint) then resumed by the same command; returns (full, cut) run dirs."""
    def cfg(run):
        return load_config(ROOT / config, [*base, f"data.path={data}", f"run.dir={run}", "sample.num_samples=0"])
    full, cut = tmp_path / "full", tmp_path / "cut"
    Trainer(cfg(full)).fit()
    Trainer(cfg(cut)).fit(stop_at=stop_at)
    Trainer(cfg(cut)).fit()
    return full, cut


def launch(data, run_dir, *extra, nproc=1, expect=0, config="configs/cola_tiny.yaml", base=TINY):
    """Run launchers/pretrain.py as a user would: plain python for 1 process, torchrun for more."""
    args = [str(ROOT / "launchers/pretrain.py"), "--config", str(ROOT / config),
            *overrides(data, run_dir, *extra, base=base)]
    cmd = ([sys.executable, *args] if nproc == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert p.returncode == expect, p.stdout[-3000:] + p.stderr[-3000:]
    return p


def test_resume_is_bit_identical_to_uninterrupted(tiny_data, tmp_path):
    full = tmp_path / "full"
    train_inproc(tiny_data, full, "train.max_steps=8", "train.ckpt_every=4")
    cut = tmp_path / "cut"
    # cut after step 5 (logged, not checkpointed), as a crash would; the same command resumes from step 4
    train_inproc(tiny_data, cut, "train.max_steps=8", "train.ckpt_every=4", stop_at=5)
    assert len(losses(cut)) == 5
    train_inproc(tiny_data, cut, "train.max_steps=8", "train.ckpt_every=4")
    assert losses(cut) == losses(full)  # bit for bit, on CPU
    assert len(losses(cut)) == 8
    a = load_file(str(latest_checkpoint(full) / "model.safetensors"))
    b = load_file(str(latest_checkpoint(cut) / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_grad_accumulation_matches_full_batch(tiny_data, tmp_path):
    train_inproc(tiny_data, tmp_path / "a", "train.max_steps=4")
    train_inproc(tiny_data, tmp_path / "b", "train.max_steps=4", "train.grad_accum=2")
    assert losses(tmp_path / "a") == pytest.approx(losses(tmp_path / "b"), rel=1e-5)


def test_ddp_two_processes_match_one_process_and_resume_across_world_sizes(tiny_data, tmp_path):
    one = tmp_path / "one"
    launch(tiny_data, one, "train.max_steps=6", "train.ckpt_every=3")
    two = tmp_path / "two"
    p = launch(tiny_data, two, "train.max_steps=3", "train.ckpt_every=3", nproc=2)
    assert "world=2" in p.stdout
    # Tolerance: gradient all-reduce sums in a different order than one process does, so the
    # runs agree to float32 rounding, not bit for bit.
    assert losses(two) == pytest.approx(losses(one)[:3], rel=1e-5)
    # the latent statistics (tracked in these stage-2 runs) come from the whole global batch, so the
    # 2-process checkpoint holds those of a 1-process run (the old per-rank EMA kept rank 0's half)
    one3 = tmp_path / "one3"
    launch(tiny_data, one3, "train.max_steps=3", "train.ckpt_every=3")
    s1, s2 = ({k: v for k, v in load_file(str(latest_checkpoint(r) / "model.safetensors")).items()
               if k.startswith("vae.latent_")} for r in (one3, two))
    assert set(s1) == {"vae.latent_shift", "vae.latent_scale"} and not torch.equal(s1["vae.latent_scale"],
                                                                                 torch.ones_like(s1["vae.latent_scale"]))
    for k, v in s1.items():
        torch.testing.assert_close(s2[k], v, rtol=1e-5, atol=1e-6)
    # resume the 2-process run with 1 process: the data position and keyed noise carry over
    p = launch(tiny_data, two, "train.max_steps=6", "train.ckpt_every=3")
    assert "world size changed 2 -> 1" in p.stdout
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)


def test_non_finite_steps_in_a_row_stop_with_a_clear_error_keeping_the_checkpoint_before_them(tiny_data, tmp_path):
    run = tmp_path / "nan"
    train_inproc(tiny_data, run, "train.max_steps=2", "train.ckpt_every=2")
    p = launch(tiny_data, run, "train.max_steps=8", "train.ckpt_every=2", "model.vae.beta=.nan", expect=2)
    assert "non-finite loss or gradient at step 5" in p.stderr and "3 steps in a row, 3..5" in p.stderr
    assert "from before them" in p.stderr
    assert latest_checkpoint(run).name == "step_00000002"  # step 4 fell inside the run: not written
    rows = [json.loads(ln) for ln in (run / "nonfinite_batches.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [3, 4, 5] and all(len(r["sample_indices"]) == 8 for r in rows)


@pytest.mark.parametrize("nproc", [1, 2])
def test_a_non_finite_step_is_skipped_and_counted(tiny_data, tmp_path, nproc):
    """A NaN injected into step 3's loss (so its gradients are NaN too): no update at that step on
    any rank, the weights after it are those after step 2, training goes on, the count is logged."""
    run = tmp_path / "skip"
    launch(tiny_data, run, "train.max_steps=5", "train.ckpt_every=1", "train.keep_checkpoints=10",
           "train.inject_nonfinite_steps=[3]", nproc=nproc)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in rows if "loss" in r}
    assert steps[3]["loss"] != steps[3]["loss"] and [steps[k]["skipped_nonfinite"] for k in (2, 3, 5)] == [0, 1, 1]
    assert all(steps[k]["loss"] == steps[k]["loss"] for k in (1, 2, 4, 5))
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step_")) == [
        f"step_{k:08d}" for k in (1, 2, 4, 5)]  # none inside the skipped run
    rec = [json.loads(ln) for ln in (run / "nonfinite_batches.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rec] == [3] and len(rec[0]["sample_indices"]) == 8


def test_a_skipped_step_leaves_weights_and_optimizer_state_untouched(tiny_data, tmp_path):
    cfg = load_config(ROOT / "configs/cola_tiny.yaml", overrides(tiny_data, tmp_path / "r", "train.max_steps=3",
                                                                  "train.ckpt_every=2", "train.inject_nonfinite_steps=[3]"))
    trainer = Trainer(cfg)
    trainer.fit(stop_at=3)
    after = getattr(trainer.model, "module", trainer.model).state_dict()
    w2 = load_file(str(tmp_path / "r" / "checkpoints" / "step_00000002" / "model.safetensors"))
    assert all(torch.equal(after[k], w2[k]) for k in w2)
    assert all(p.grad is None for p in trainer.model.parameters())


def test_launcher_reports_config_and_data_errors(tiny_data, tmp_path):
    p = launch(tiny_data, tmp_path / "r", "train.max_step=3", expect=2)
    assert "train.max_step" in p.stderr and "did you mean train.max_steps" in p.stderr
    p = launch(tmp_path / "nowhere", tmp_path / "r", expect=2)
    assert "tokenizer.json not found" in p.stderr
    p = launch(tiny_data, tmp_path / "r", "model.seq_len=16", expect=2)
    assert "seq_len" in p.stderr


def test_corrupt_sample_stops_naming_it_or_is_skipped_and_counted(tiny_data, tmp_path):
    """A sample whose bytes changed on disk (same file size) that step 1 reads: data.on_corrupt=error
    stops before any update naming the shard and the sample; skip trains on, counting it."""
    import shutil
    import tarfile
    from lflm_dist.data.loader import TokenBatches
    data = shutil.copytree(tiny_data, tmp_path / "data")
    victim = TokenBatches(data / "train", global_batch_size=8, num_workers=0).global_indices(0)[0]
    shard = data / "train" / f"shard-{victim // 256:06d}.tar"  # tiny_data: 256 samples per shard
    with tarfile.open(shard) as tf:
        m = next(m for m in tf if m.name.startswith(f"{victim:09d}."))
    raw = bytearray(shard.read_bytes())
    raw[m.offset_data + m.size - 4] ^= 0x01
    shard.write_bytes(bytes(raw))
    p = launch(data, tmp_path / "err", "train.max_steps=2", expect=2)
    assert f"{shard.name} sample {victim}: checksum mismatch" in p.stderr
    assert not (tmp_path / "err" / "checkpoints").exists()
    launch(data, tmp_path / "skip", "train.max_steps=3", "data.on_corrupt=skip")
    rows = [json.loads(ln) for ln in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_samples"] for r in rows if "loss" in r] == [1, 1, 1]


def test_data_from_another_tokenizer_is_refused_before_training(tiny_data, tmp_path):
    import shutil
    from lflm_dist.data.tokenizer import Tokenizer
    run = tmp_path / "run"
    launch(tiny_data, run, "train.max_steps=2")
    other = shutil.copytree(tiny_data, tmp_path / "other")
    Tokenizer.train(["a different corpus entirely, with other merges"] * 20, vocab_size=300).save(other / "tokenizer.json")
    p = launch(other, tmp_path / "fresh", "train.max_steps=2", expect=2)
    assert "records tokenizer_sha256" in p.stderr and "written with another tokenizer" in p.stderr
    # consistent data, but not the tokenization the run started with: resuming on it is refused
    from conftest import tiny_documents
    from lflm_dist.data import split_documents
    from lflm_dist.data.shards import write_shards
    retok = tmp_path / "retok"
    train, valid = split_documents(tiny_documents(), valid_fraction=0.1, seed=0)
    tok = Tokenizer.train([t for _, t in train], vocab_size=320)
    tok.save(retok / "tokenizer.json")
    for split, docs in (("train", train), ("valid", valid)):
        write_shards(docs, tok, retok / split, seq_len=32, samples_per_shard=256)
    p = launch(retok, run, "train.max_steps=4", expect=2)
    assert "was trained with the tokenizer in" in p.stderr and "differently tokenized data" in p.stderr
    launch(retok, tmp_path / "new_run", "train.max_steps=1")  # the data itself is fine


def test_run_dir_has_config_metrics_wandb_and_plot(tiny_data, tmp_path):
    run = tmp_path / "logged"
    p = launch(tiny_data, run, "train.max_steps=3", "run.wandb_mode=offline", "sample.num_samples=2",
               "sample.max_new_tokens=8")
    cfg = load_config(run / "config.yaml")  # the resolved config loads back
    assert cfg.train.max_steps == 3 and cfg.model.vocab_size > 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    for key in ("step", "loss", "recon", "fm", "neg_entropy", "tokens_per_s", "lr"):
        assert key in rows[0], key
    assert any("valid/loss" in r for r in rows)
    assert "validation:" in p.stdout and "--- sample 1" in p.stdout
    assert list((run / "wandb").glob("offline-run-*")), "wandb offline run missing"
    out = subprocess.run([sys.executable, "-m", "lflm_dist.plot", str(run), "--out", str(tmp_path / "p.png")],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    g = subprocess.run([sys.executable, str(ROOT / "launchers/generate.py"), "--run", str(run), "--prompt", "KING",
                        "--num-samples", "1", "--max-new-tokens", "8", "--steps", "2"],
                       capture_output=True, text=True, cwd=ROOT)
    assert g.returncode == 0 and g.stdout.startswith("--- sample 0 ---\nKING"), g.stderr
    bad = subprocess.run([sys.executable, str(ROOT / "launchers/generate.py"), "--run", str(run), "--churn", "1.5"],
                         capture_output=True, text=True, cwd=ROOT)
    assert bad.returncode == 2 and "sample.churn must be in [0, 1]" in bad.stderr, bad.stderr


def test_a_second_run_on_a_live_run_dir_stops_and_a_dead_ones_lock_does_not_stick(tiny_data, tmp_path):
    """Two runs on one run.dir would interleave checkpoints: the second stops, naming the holder.
    A run killed with SIGKILL leaves no stuck lock (the kernel drops flock with the process)."""
    import signal
    run = tmp_path / "run"
    holder = Trainer(load_config(ROOT / "configs/cola_tiny.yaml", overrides(tiny_data, run, "train.max_steps=2")))
    p = launch(tiny_data, run, "train.max_steps=2", expect=2)
    assert f"run.dir {run} is in use by another training run (pid {os.getpid()} on" in p.stderr
    assert not (run / "checkpoints").exists()  # the second run wrote nothing
    holder.fit()  # finishes and releases the lock
    launch(tiny_data, run, "train.max_steps=3")  # resumes: the dir is free again
    assert len(losses(run)) == 3

    code = f"from lflm_dist.train.run_lock import RunLock; import time; lock = RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(600)"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert proc.stdout.readline().strip() == "held"
        launch(tiny_data, run, "train.max_steps=3", expect=2)
        p = launch(tiny_data, run, "train.max_steps=3", nproc=2, expect=1)  # torchrun: its workers exited 2
        assert p.stderr.count("is in use by another training run") >= 2  # every rank stops, none waits forever
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    launch(tiny_data, run, "train.max_steps=4")  # the dead holder's lock is gone
    assert len(losses(run)) == 4


def signal_after_steps(data, run, steps, *extra, sig=None):
    """Start launchers/pretrain.py, SIGTERM it (or `sig`) once `steps` metric lines are logged;
    returns (process, stdout, stderr) after it exits."""
    import signal
    import time
    args = [sys.executable, str(ROOT / "launchers/pretrain.py"), "--config", str(ROOT / "configs/cola_tiny.yaml"),
            *overrides(data, run, *extra)]
    p = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    metrics = run / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= steps):
        assert p.poll() is None, p.communicate()
        time.sleep(0.05)
    p.send_signal(sig or signal.SIGTERM)
    out, err = p.communicate(timeout=300)
    return p, out, err


def test_sigterm_finishes_the_step_checkpoints_and_stops_without_requeue(tiny_data, tmp_path):
    """SIGTERM (kill, scancel, torchrun): the step in progress finishes and is checkpointed, the run
    exits 0 without DONE (so a batch script does not take the stage as finished), nothing logged is lost,
    and the same command resumes from that step. In-process, the handlers are put back after fit."""
    import signal
    run = tmp_path / "run"
    p, out, err = signal_after_steps(tiny_data, run, 3, "train.max_steps=400", "train.ckpt_every=1000")
    assert p.returncode == 0, out[-2000:] + err[-2000:]
    assert "[preempt] signal SIGTERM: stopped after step" in out and "not requeued (SIGTERM)" in out
    step = len(losses(run))
    assert 3 <= step < 400 and latest_checkpoint(run).name == f"step_{step:08d}" and not (run / "DONE").exists()
    p = launch(tiny_data, run, f"train.max_steps={step + 2}")
    assert f"at step {step}" in p.stdout and len(losses(run)) == step + 2

    before = signal.getsignal(signal.SIGTERM)
    train_inproc(tiny_data, tmp_path / "inproc", "train.max_steps=1")
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_grace_period_that_runs_out_exits_without_a_half_written_checkpoint(tiny_data, tmp_path):
    """train.preempt_grace_s shorter than a step: the process exits (0) by itself, saying so, and the
    newest checkpoint stays the previous one (a run resumes from it)."""
    run = tmp_path / "run"
    p, out, err = signal_after_steps(tiny_data, run, 3, "train.max_steps=400", "train.ckpt_every=2",
                                     "train.global_batch_size=64", "train.preempt_grace_s=1e-6")
    assert p.returncode == 0 and "train.preempt_grace_s=1e-06 s ran out" in err, out[-2000:] + err[-2000:]
    assert "stopped after step" not in out  # the signal's own checkpoint never completed
    newest = int(latest_checkpoint(run).name.split("_")[1])
    assert newest % 2 == 0 and len(losses(run)) >= newest  # a regular one, from before the signal
    p = launch(tiny_data, run, f"train.max_steps={newest + 1}", "train.global_batch_size=64", "train.ckpt_every=2")
    assert f"at step {newest}" in p.stdout


def test_retention_keeps_the_newest_and_every_mth_checkpoint(tiny_data, tmp_path):
    run = tmp_path / "kept"
    train_inproc(tiny_data, run, "train.max_steps=7", "train.ckpt_every=1", "train.keep_checkpoints=2",
                 "train.keep_every=3")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        f"step_{k:08d}" for k in (3, 6, 7)]  # 6 and 7 the newest two, 3 a multiple of 3


def test_compiled_blocks_give_the_eager_losses(tiny_data, tmp_path, monkeypatch):
    """parallel.compile (each shard unit through torch.compile with static shapes): Cola stage 2
    with random DiT block sizes (the distinct-t table changes size between steps, so several
    sizes compile) trains to the eager run's losses, in fp32 on CPU (Inductor may reorder sums)."""
    extra = ["train.max_steps=4", "train.ckpt_every=4", "model.dit.random_block_size=true", "model.dit.block_size=8",
             "model.dit.prompt_in_block_prob=0.5", "model.dit.token_mixture=true", "model.dit.history_tokens=true"]
    launch(tiny_data, tmp_path / "eager", *extra)
    monkeypatch.setenv("TORCH_LOGS", "recompiles")
    p = launch(tiny_data, tmp_path / "compiled", *extra, "parallel.compile=true")
    # compiled indeed: Dynamo recompiled the DiT's blocks for another (power-of-two) table size,
    # and never ran out of its recompile budget (which would fall back to eager)
    assert "tensor 'cond' size mismatch" in p.stderr, p.stderr[-3000:]
    assert "recompile_limit" not in p.stderr and "cache_size_limit" not in p.stderr, p.stderr[-3000:]
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert len(eager) == len(compiled) == 4
    for a, b in zip(compiled, eager):
        assert abs(a - b) <= 1e-4 * abs(b), (compiled, eager)
