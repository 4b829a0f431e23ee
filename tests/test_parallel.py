"""Parallel strategies on 2 (or 4) gloo processes against one process at the same global
batch: DDP, FSDP2, DeepSpeed ZeRO-1/2/3, megatron TP=2 (x DDP, x FSDP2; vocab-parallel
embeddings, heads and cross-entropy) and TP=2 x DP=2 on 4 processes give the same losses and
gradient norms, save and resume (FSDP2 reshards 2 -> 1 process; ZeRO refuses a changed world
size by name), report MFU and the memory the planner predicts, and export to plain
safetensors with the same logits.

Tolerance: losses agree to rel 1e-5 with the 1-process run, pre-clip gradient norms to rel
1e-4 (only float summation order differs: all-reduce, reduce-scatter, TP partial sums, the
vocab-parallel softmax); the exported weights of a sharded run
give logits within rtol/atol 1e-4 of the 1-process checkpoint's, and exporting the
1-process checkpoint reproduces its logits bit for bit."""
import json
import re

import pytest
import torch

from conftest import load_script
from lflm_dist.config import ConfigError, load_config
from lflm_dist.generate import load_run
from lflm_dist.parallel.plan import activation_bytes, plan
from test_train import ROOT, launch, losses, overrides

# with the decoder run twice per forward (lambda_denoised_ce): a module called twice under each strategy;
# the DiT's token mixture, whose running token means are summed over micro-batches and DP ranks; and
# the history's token embedding (vocab-parallel under TP); and the release's random block sizes, with
# which the DiT computes adaLN once per distinct t (a lookup table, its projection TP-gathered)
COLA_TERMS = ["model.cola.lambda_denoised_ce=0.5", "model.dit.token_mixture=true", "model.dit.history_tokens=true",
              "model.dit.random_block_size=true"]
STEPS = ["train.max_steps=4", "train.ckpt_every=2", *COLA_TERMS]
FIRST = ["train.max_steps=2", "train.ckpt_every=2", *COLA_TERMS]
TP = ["parallel.tp=2"]
FSDP = ["parallel.strategy=fsdp2"]
CASES = {  # name: (overrides, processes, processes for the resumed half); global batch 8 throughout
    "ddp": ([], 2, 2),
    "fsdp2": (FSDP, 2, 1),  # DCP reshards 2 -> 1 process
    "zero1": (["parallel.strategy=deepspeed", "parallel.zero_stage=1"], 2, 2),
    "zero2": (["parallel.strategy=deepspeed", "parallel.ds_config=configs/deepspeed/zero2.json"], 2, 2),
    "zero3": (["parallel.strategy=deepspeed", "parallel.zero_stage=3"], 2, 2),
    # optimizer state in host memory, stepped by DeepSpeed's CPU Adam (its C++ op built on first use)
    "zero2_offload": (["parallel.strategy=deepspeed", "parallel.zero_stage=2", "parallel.offload_optimizer=true"], 2, 2),
    "tp2": (TP, 2, 2),
    "fsdp2_tp2": (FSDP + TP, 2, 2),
    "ddp_tp2_dp2": (TP, 4, 4),  # 4 sequences per data-parallel rank
    "fsdp2_tp2_dp2": (FSDP + TP, 4, 4),
}


# What one TP rank holds 1/tp of, by parameter name (written out here rather than read from
# lflm_dist.parallel.tp.tp_plan, so the memory check below is independent of the code it tests):
# the blocks' linears, embeddings (the DiT's history-token table too) and heads, and the DiT's adaLN
# projections, timestep MLP and final modulation and token-mixture logits with their biases, except
# the row-parallel t_embed.mlp.2.bias.
TP_SHARDED = re.compile(r"\.(wqkv|wo|w12|w3|head|embed|tok_embed)\.weight$"
                        r"|\.(adaln|final_mod|t_embed\.mlp\.0|tokens\.logits)\.(weight|bias)$"
                        r"|\.t_embed\.mlp\.2\.weight$")


def tp_rank_params(cfg, tp: int) -> tuple[int, set[str]]:
    """Trainable parameters one TP rank holds (embedding rows padded to a multiple of tp), and
    the names counted as sharded."""
    from lflm_dist.models.registry import build_model
    model = build_model(cfg.model, init_pretrained=False, device="meta")
    n, sharded = 0, set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        split = bool(TP_SHARDED.search(name))
        n += (-(-p.shape[0] // tp) if split else p.shape[0]) * (p.numel() // p.shape[0])
        if split:
            sharded.add(name)
    return n, sharded


def _export_module():
    return load_script("launchers/export.py", "export_launcher")


def logits_of(model, x):
    return model.vae.decoder(model.vae.encoder(x)[0])


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("par") / "one"
    launch(tiny_data, run, *STEPS)
    return run, losses(run)


@pytest.fixture(scope="module")
def probe(tiny_data):
    from lflm_dist.data.loader import eval_batches
    return next(iter(eval_batches(tiny_data / "valid", batch_size=4, seq_len=32)))["input_ids"]


@pytest.mark.parametrize("name", list(CASES))
def test_strategy_matches_one_process_resumes_and_exports(name, reference, probe, tiny_data, tmp_path):
    ref_run, ref_losses = reference
    extra, nproc, resume_nproc = CASES[name]
    tp = 2 if "tp2" in name else 1
    strategy = "deepspeed" if name.startswith("zero") else "fsdp2" if name.startswith("fsdp2") else "ddp"
    run = tmp_path / name
    p = launch(tiny_data, run, *extra, *FIRST, nproc=nproc)
    assert f"world={nproc} strategy={strategy} tp={tp}" in p.stdout
    optimizer = "DeepSpeedCPUAdam" if "offload" in name else "AdamW(fused)"
    assert f"optimizer={optimizer}" in p.stdout
    mem = json.loads((run / "memory" / "rank0.json").read_text())
    if name == "zero2":  # ZeRO partitions are not resharded: a changed world size stops, naming both
        p = launch(tiny_data, run, *extra, *STEPS, expect=2)
        assert "written by 2 processes and this run has 1" in p.stderr
    p = launch(tiny_data, run, *extra, *STEPS, nproc=resume_nproc)
    assert "[resume] from" in p.stdout and "at step 2" in p.stdout
    got = losses(run)
    assert len(got) == 4
    assert got == pytest.approx(ref_losses, rel=1e-5), (got, ref_losses)

    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    assert all(0 < r["mfu"] < 1.5 and r["peak_mem_mb"] > 0 for r in steps)
    ref_rows = [json.loads(ln) for ln in (ref_run / "metrics.jsonl").read_text().splitlines()]
    ref_norms = [r["grad_norm"] for r in ref_rows if "loss" in r]
    assert [r["grad_norm"] for r in steps] == pytest.approx(ref_norms, rel=1e-4)
    if tp > 1:  # vocab-parallel recon_acc (argmax across vocabulary shards)
        ref_acc = [r["recon_acc"] for r in ref_rows if "loss" in r]
        assert [r["recon_acc"] for r in steps] == pytest.approx(ref_acc, abs=1e-6)

    # planner: parameter + optimizer bytes of rank 0 (fp32 on CPU), from the first launch
    cfg = load_config(run / "config.yaml")
    pl = plan(cfg, name.split("_")[0] if strategy == "deepspeed" else strategy, gpus=nproc, tp=tp, micro_batch=4, bf16=False)
    if name.startswith("zero"):  # deepspeed pads flat partitions to alignment
        assert mem["params"] == pytest.approx(pl["params"], rel=0.02)
        assert mem["optimizer"] == pytest.approx(pl["optimizer"], rel=0.02)
    else:
        assert (mem["params"], mem["optimizer"]) == (pl["params"], pl["optimizer"])
    if tp > 1 and strategy == "ddp":  # each rank holds the whole TP shard: fp32 bytes = 4 x its params
        n, sharded = tp_rank_params(cfg, tp)
        for part in ("adaln.weight", "adaln.bias", "t_embed.mlp.0.weight", "t_embed.mlp.2.weight", "final_mod.weight"):
            assert any(s.startswith("dit.") and s.endswith(part) for s in sharded), part
        assert mem["params"] == 4 * n

    # export -> plain safetensors -> same logits as the 1-process checkpoint at the same step
    out = _export_module().export(run, tmp_path / "export")
    files = sorted(f.name for f in out.iterdir())
    assert files == ["config.yaml", "dit.safetensors", "tokenizer.json", "vae.safetensors"]
    exported, _, _ = load_run(out)
    ref_model, _, _ = load_run(ref_run)
    with torch.no_grad():
        torch.testing.assert_close(logits_of(exported, probe), logits_of(ref_model, probe), rtol=1e-4, atol=1e-4)


def test_export_of_plain_checkpoint_is_bit_exact(reference, probe, tmp_path):
    ref_run, _ = reference
    out = _export_module().export(ref_run, tmp_path / "export")
    a, _, _ = load_run(out)
    b, _, _ = load_run(ref_run)
    with torch.no_grad():
        assert torch.equal(logits_of(a, probe), logits_of(b, probe))


def test_export_average_is_the_mean_of_the_checkpoints(reference, probe, tmp_path):
    # launchers/export.py --average: a model soup of steps 2 and 4 of one run
    from lflm_dist.train.checkpoint import read_model_state
    ref_run, _ = reference
    steps = sorted((ref_run / "checkpoints").glob("step_*"))
    assert len(steps) == 2
    exp = _export_module()
    out = exp.export(ref_run, tmp_path / "soup", steps[0], [steps[1]])
    soup, _, _ = load_run(out)
    a, b = (read_model_state(s) for s in steps)
    got = soup.state_dict()
    moved = [k for k in a if not torch.equal(a[k], b[k])]
    assert moved and all(torch.allclose(got[k], (a[k] + b[k]) / 2, atol=1e-7, rtol=0) for k in moved)
    assert not any(torch.equal(got[k], a[k]) for k in moved)
    # the mean of a checkpoint with itself is that checkpoint, bit for bit
    same, _, _ = load_run(exp.export(ref_run, tmp_path / "same", steps[1], [steps[1]]))
    last, _, _ = load_run(ref_run)
    with torch.no_grad():
        assert torch.equal(logits_of(same, probe), logits_of(last, probe))


def test_unsupported_combinations_fail_at_start_up():
    with pytest.raises(ConfigError, match="supported combinations"):
        load_config(ROOT / "configs/cola_tiny.yaml", ["parallel.strategy=deepspeed", "parallel.tp=2"])
    load_config(ROOT / "configs/cola_tiny.yaml", ["parallel.strategy=fsdp2", "parallel.tp=2"])  # supported
    with pytest.raises(ConfigError, match="must divide model.vocab_size"):
        load_config(ROOT / "configs/cola_tiny.yaml", ["parallel.tp=2", "model.vocab_size=385"])
    with pytest.raises(ConfigError, match="only applies to parallel.strategy=deepspeed"):
        load_config(ROOT / "configs/cola_tiny.yaml", ["parallel.zero_stage=3"])
    with pytest.raises(ConfigError, match="must divide model.vae.encoder.n_heads"):
        load_config(ROOT / "configs/cola_tiny.yaml", ["parallel.tp=3"])


@pytest.mark.parametrize("extra", [[], ["model.cola.lambda_denoised_ce=1"]], ids=["plain", "denoised_ce"])
def test_activation_estimate_within_factor_two_of_saved_tensors(extra, tiny_data):
    """The planner's activation bytes against the bytes autograd saves for backward in one
    fp32 forward of the tiny model (micro-batch 4), with and without checkpointing (and with the
    decoder's second pass of lambda_denoised_ce)."""
    from lflm_dist.models.noise import sample_keys
    from lflm_dist.models.registry import build_model
    from lflm_dist.parallel.fsdp import apply_activation_checkpointing
    cfg = load_config(ROOT / "configs/cola_tiny.yaml", overrides(tiny_data, "unused", *extra))
    cfg.model.vocab_size = 385
    x = torch.randint(0, 384, (4, 32))
    measured = {}
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_model(cfg.model, init_pretrained=False)
        if ckpt:
            apply_activation_checkpointing(model)
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model({"input_ids": x, "noise_key": sample_keys(0, 0, 0, 4)})["loss"]
        params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        measured[ckpt] = sum(n for (ptr, _), n in seen.items() if ptr not in params)
    for ckpt in (False, True):
        # with checkpointing, compare what forward keeps (the recomputed block lives only in backward)
        est = activation_bytes(cfg, 4, bf16=False, checkpointing=ckpt, include_recompute=False)
        assert 0.5 < est / measured[ckpt] < 2.0, (ckpt, est, measured[ckpt])
    assert measured[True] < measured[False]


def test_cpu_peak_is_measured_in_the_training_dtype(tmp_path, monkeypatch):
    """MFU on CPU divides by a peak measured in the dtype the run trains in: a bf16 run (2-3x the
    fp32 matmul rate where the CPU has AVX512-BF16 or AMX) is not judged against the fp32 peak,
    which put its MFU above 1. Each dtype's peak is cached under its own key."""
    from lflm_dist.parallel import mfu
    monkeypatch.setattr(mfu, "CACHE", tmp_path / "cpu_peak.json")
    fp32, bf16 = mfu.device_peak(torch.device("cpu"), False), mfu.device_peak(torch.device("cpu"), True)
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    assert sorted(cache.values()) == sorted([fp32, bf16]) and all(v > 0 for v in cache.values())
    assert [k.endswith("|bf16") for k in sorted(cache)] == [False, True]


def test_cpu_peak_keeps_the_best_measurement(tmp_path, monkeypatch):
    """A peak measured while another process loads the cores reads low; the cache keeps the best
    rate measured so far, so one such measurement does not inflate the MFU of every later run."""
    from lflm_dist.parallel import mfu
    monkeypatch.setattr(mfu, "CACHE", tmp_path / "cpu_peak.json")
    rates = iter([100e9, 300e9, 200e9])
    monkeypatch.setattr(mfu, "measure_cpu_peak", lambda **kw: next(rates))
    assert [mfu.cpu_peak() for _ in range(3)] == [100e9, 300e9, 300e9]
    assert list(json.loads((tmp_path / "cpu_peak.json").read_text()).values()) == [300e9]


def test_cpu_peak_measurement_leaves_the_global_rng_alone():
    """The trainer measures the peak after seeding: drawing its matrices from the global RNG would
    shift every later random draw of the run (noise, timesteps, dropout) by the measurement."""
    from lflm_dist.parallel import mfu
    before = torch.get_rng_state()
    for dtype in (torch.float32, torch.bfloat16):
        assert mfu.measure_cpu_peak(64, 1, dtype) > 0
    assert torch.equal(torch.get_rng_state(), before)
