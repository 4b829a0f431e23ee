"""LFLM (lflm_dist.models.lflm): the ODE solve against a closed form, gradients through odeint and
its adjoint, the non-autoregressive decoder, meta-device materialisation, split-invariant losses,
the KL schedule, an overfit without posterior collapse, and on the overfit model the likelihood
bounds, interpolation, prompt-conditioned sampling and the end token; config validation."""
import copy
import inspect

import pytest
import torch
import torch.nn as nn

from lflm_dist.config import Config, ConfigError, LFLMConfig, ModelConfig, TransformerConfig
from lflm_dist.models.family import BoundSettings
from lflm_dist.models.init import materialize
from lflm_dist.models.lflm import LFLM
from lflm_dist.models.noise import sample_keys

V, L, C = 32, 12, 8


def make_cfg(**lflm) -> ModelConfig:
    kw = dict(embed_dim=16, encoder_hidden=16, latent_dim=C, ode_hidden=32, ode_layers=2, ode_steps=4,
              decoder=TransformerConfig(dim=32, n_layers=2, n_heads=2), latent_tokens=2, beta_steps=100)
    kw.update(lflm)
    return ModelConfig(family="lflm", vocab_size=V, seq_len=L, lflm=LFLMConfig(**kw))


def build(seed: int = 0, **lflm) -> LFLM:
    with torch.device("meta"):
        model = LFLM(make_cfg(**lflm))
    return materialize(model, "cpu", seed)


def batch(tokens, seed=0, step=0, first=0):
    return {"input_ids": tokens, "noise_key": sample_keys(seed, step, first, tokens.shape[0])}


class LinearField(nn.Module):
    """Stands in for the ODE's MLP: f(z, t) = A z (its input is [z, time features])."""

    def __init__(self, A):
        super().__init__()
        self.A = A

    def forward(self, x):
        return x[:, :self.A.shape[0]] @ self.A.T


# ----------------------------------------------------------------------------- the flow
@pytest.mark.parametrize("method,extra", [("rk4", dict(ode_steps=32)), ("dopri5", dict(rtol=1e-9, atol=1e-9))])
def test_ode_solve_matches_matrix_exponential_and_inverts(method, extra):
    model = build(ode_method=method, **extra)
    g = torch.Generator().manual_seed(1)
    A = torch.randn(C, C, generator=g, dtype=torch.float64) * 0.5
    model.ode.net = LinearField(A)
    z0 = torch.randn(5, C, generator=g, dtype=torch.float64)
    z1 = model.flow(z0)
    assert torch.allclose(z1, z0 @ torch.linalg.matrix_exp(A).T, rtol=1e-6, atol=1e-6)
    assert model.last_nfe > 0
    assert torch.allclose(model.flow_inverse(z1), z0, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(z1, z0, atol=1e-2)  # the field does something


def test_grads_flow_through_odeint_and_match_the_adjoint():
    toks = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(0))
    grads = {}
    for adjoint in (False, True):
        model = build(seed=3, adjoint=adjoint, ode_steps=16)
        model.loss(batch(toks))["loss"].backward()
        grads[adjoint] = {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(("ode.", "lstm."))}
    for n, g in grads[False].items():
        assert torch.isfinite(g).all() and g.abs().sum() > 0, n
        assert torch.allclose(grads[True][n], g, rtol=1e-3, atol=1e-6), n
    assert any(not torch.equal(grads[True][n], g) for n, g in grads[False].items())  # the adjoint did run


# ----------------------------------------------------------------------------- decoder, init, loss
def test_decoder_is_non_autoregressive():
    model = build()
    assert list(inspect.signature(model.decode).parameters) == ["z1", "length"]  # no tokens to condition on
    z1 = torch.randn(3, C)
    logits = model.decode(z1, L)
    assert logits.shape == (3, L, V)
    assert torch.equal(model.decode(z1, L), logits)
    assert torch.allclose(model.decode(z1, 5), logits[:, :5], atol=1e-6)  # position i depends on (z1, i) only
    assert not torch.allclose(logits[:, 0], logits[:, 1], atol=1e-3)  # positions are told apart
    a = torch.randint(0, V, (3, L), generator=torch.Generator().manual_seed(0))
    b = a.clone()
    b[:, 4] = (b[:, 4] + 1) % V
    ce = [nn.functional.cross_entropy(logits.transpose(1, 2), t, reduction="none") for t in (a, b)]
    keep = torch.arange(L) != 4
    assert torch.equal(ce[0][:, keep], ce[1][:, keep]) and not torch.equal(ce[0][:, 4], ce[1][:, 4])
    # the training loss decodes once, from the latent alone
    calls = []
    orig = model.decode
    model.decode = lambda z, n: calls.append((z.shape, n)) or orig(z, n)
    model.loss(batch(a))
    assert calls == [((3, C), L)]


def test_meta_materialisation_is_seeded_and_runs():
    a, b, c = build(seed=5), build(seed=5), build(seed=6)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lstm.weight_hh_l0"], c.state_dict()["lstm.weight_hh_l0"])
    bound = 1 / 16 ** 0.5
    for n, p in a.lstm.named_parameters():
        assert p.abs().max() <= bound and p.std() > bound / 3, n  # U(±1/sqrt(hidden))
    assert int(a.kl_step) == 0
    out = a.loss(batch(torch.randint(0, V, (2, L))))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert a.lstm.weight_ih_l0.grad is not None and a.lstm.weight_ih_l0.grad.abs().sum() > 0
    # a parameter swapped behind nn.LSTM's back (as FSDP2 does) is the one the forward uses
    swapped = nn.Parameter(torch.zeros_like(a.lstm.weight_hh_l0))
    a.lstm._parameters["weight_hh_l0"] = swapped
    a.loss(batch(torch.randint(0, V, (2, L))))["loss"].backward()
    assert swapped.grad is not None and swapped.grad.abs().sum() > 0


def test_loss_is_split_invariant_and_keyed():
    model = build(seed=1)
    toks = torch.randint(0, V, (4, L), generator=torch.Generator().manual_seed(2))
    full = model.loss(batch(toks, seed=4, step=7))
    halves = [model.loss(batch(toks[i:i + 2], seed=4, step=7, first=i)) for i in (0, 2)]
    for k in ("loss", "recon", "kl", "kl_dim/03"):
        assert torch.allclose(full[k], (halves[0][k] + halves[1][k]) / 2, rtol=1e-5, atol=1e-6), k
    assert torch.equal(model.loss(batch(toks, seed=4, step=7))["loss"], full["loss"])
    assert not torch.allclose(model.loss(batch(toks, seed=4, step=8))["recon"], full["recon"])
    assert {f"kl_dim/{i:02d}" for i in range(C)} <= set(full) and full["active_units"].item() <= C


def test_beta_schedules_and_step_counter():
    lin, cyc, const = build(beta=0.5), build(beta_schedule="cyclical"), build(beta_schedule="constant", beta=0.3)
    for step, want_lin, want_cyc in ((0, 0.0, 0.0), (25, 0.125, 0.5), (50, 0.25, 1.0), (100, 0.5, 0.0),
                                     (130, 0.5, 0.6), (260, 0.5, 1.0)):
        for m in (lin, cyc, const):
            m.kl_step.fill_(step)
        assert lin.beta().item() == pytest.approx(want_lin) and cyc.beta().item() == pytest.approx(want_cyc)
        assert const.beta().item() == pytest.approx(0.3)
    lin.kl_step.zero_()
    lin.update_statistics()
    lin.eval().update_statistics()
    assert int(lin.kl_step) == 1 and "kl_step" in lin.state_dict()  # checkpointed: resume is exact
    lin.reset_buffers()
    assert int(lin.kl_step) == 0


def test_free_bits_floor_the_penalised_kl():
    model = build(free_bits=5.0, beta_schedule="constant", beta=1.0)
    out = model.loss(batch(torch.randint(0, V, (4, L))))
    assert out["kl"] < 5.0 * C
    assert torch.allclose(out["loss"] - out["recon"], torch.tensor(5.0 * C / L))


# ----------------------------------------------------------------------------- overfit and its uses
SEQS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
                     [20, 19, 18, 17, 21, 22, 23, 24, 25, 26, 27, 28],
                     [3, 3, 4, 4, 29, 29, 30, 30, 31, 31, 1, 1],
                     [2, 12, 22, 9, 17, 4, 0, 0, 0, 0, 0, 0]])  # ends with the end token (pad_id 0)


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    model = build(seed=0, beta_steps=100)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    log = []
    for step in range(250):
        out = model.loss(batch(SEQS.repeat(2, 1), step=step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        model.update_statistics()
        log.append({k: float(v.detach()) for k, v in out.items()})
    return model.eval(), log


def test_overfit_reconstructs_without_posterior_collapse(trained):
    model, log = trained
    assert log[0]["recon_acc"] < 0.2 and log[0]["beta"] == 0.0
    assert int(model.kl_step) == 250 and log[-1]["beta"] == 1.0
    final = model.loss(batch(SEQS, seed=9))
    assert final["recon_acc"] > 0.95
    assert final["kl"] > 1.0 and final["active_units"] >= 1  # the latent carries the sequence
    assert torch.equal(model.reconstruct(SEQS), SEQS)


def test_interpolation_endpoints_reproduce_inputs(trained):
    model, _ = trained
    for spherical in (True, False):
        path = model.interpolate(SEQS[:1], SEQS[1:2], 5, spherical=spherical)
        assert len(path) == 5 and path[0] == SEQS[0].tolist() and path[-1] == SEQS[1].tolist()
    assert model.latent_arithmetic(SEQS[:1], SEQS[1:2], SEQS[1:2]) == [SEQS[0].tolist()]


def test_nll_bounds(trained):
    model, _ = trained
    s1, s8 = BoundSettings(iwae_k=1), BoundSettings(iwae_k=8)
    assert model.likelihood_kind(s1) == "elbo_bound" and model.likelihood_kind(s8) == "iwae_bound"
    assert model.estimator_info(s8)["iwae_k"] == 8 and model.eval_layout().window == L
    g = torch.Generator().manual_seed(0)
    b1 = model.nll_bound(SEQS, s1, generator=g)
    assert b1.kind == "elbo_bound" and b1.nfe > 0 and b1.nll.shape == (4,)
    assert torch.allclose(b1.nll, b1.terms["recon"] + b1.terms["kl"]) and torch.equal(b1.nll, b1.terms["neg_elbo"])
    # the recon term is the summed CE of the tokens given z1 = flow(mean + std * eps)
    eps = torch.randn(4 * 8, C, generator=g)
    with torch.no_grad():
        mean, logvar = model.encode(SEQS)
    z0 = mean + (0.5 * logvar).exp() * eps.view(4, 8, C)[:, 0]
    ce = nn.functional.cross_entropy(model.decode(model.flow(z0), L).transpose(1, 2), SEQS, reduction="none").sum(-1)
    assert torch.allclose(model.nll_bound(SEQS, s1, noise={"eps": eps.view(4, 8, C)[:, 0]}).terms["recon"], ce,
                          atol=1e-4)
    # IWAE: <= the Monte Carlo -ELBO of the same draws (Jensen), and <= the -ELBO in expectation
    b8 = model.nll_bound(SEQS, s8, noise={"eps": eps})
    e = eps.view(4, 8, C)
    zs = mean[:, None] + (0.5 * logvar).exp()[:, None] * e
    mc_kl = (0.5 * zs.pow(2) - 0.5 * e.pow(2) - 0.5 * logvar[:, None]).sum(-1).mean(1)  # mean_j log q - log p
    assert b8.kind == "iwae_bound" and torch.isfinite(b8.nll).all()
    assert (b8.terms["iwae"] <= b8.terms["recon"] + mc_kl + 1e-4).all() and torch.equal(b8.nll, b8.terms["iwae"])
    elbo = torch.stack([model.nll_bound(SEQS, s1, generator=g).nll for _ in range(16)]).mean(0)
    iwae = torch.stack([model.nll_bound(SEQS, s8, generator=g).nll for _ in range(4)]).mean(0)
    assert iwae.mean() <= elbo.mean() + 0.05
    assert torch.isfinite(b8.terms["kl"]).all() and (b8.terms["kl"] > 0).all()


def test_sampling_follows_the_prompt_is_seeded_and_stops_at_the_end_token(trained):
    model, _ = trained
    a, b = SEQS[0].tolist(), SEQS[1].tolist()

    def run(prompt, seed, **kw):
        return model.sample([prompt], 8, generator=torch.Generator().manual_seed(seed), prompt_candidates=256, **kw)[0]

    def agree(x, y):
        return sum(u == v for u, v in zip(x, y))

    outs_a = [run(a[:4], s, temperature=0) for s in range(4)]
    outs_b = [run(b[:4], s, temperature=0) for s in range(4)]
    assert sum(agree(o, a[4:]) for o in outs_a) > sum(agree(o, a[4:]) for o in outs_b) + 8
    assert sum(agree(o, b[4:]) for o in outs_b) > sum(agree(o, b[4:]) for o in outs_a) + 8
    assert run(a[:4], 1) == run(a[:4], 1) and model.training is False
    many = model.sample([[], a[:4], b[:2]], 6, generator=torch.Generator().manual_seed(3))
    assert len(many) == 3 and all(len(o) <= 6 for o in many) and all(0 not in o for o in many)
    assert many == model.sample([[], a[:4], b[:2]], 6, generator=torch.Generator().manual_seed(3))
    # continuing SEQS[3]: its end token stops the output
    d = SEQS[3].tolist()
    outs_d = [run(d[:4], s, temperature=0) for s in range(4)]
    assert sum(o == d[4:6] for o in outs_d) >= 3 and all(0 not in o for o in outs_d)
    assert run(d[:6], 0, temperature=0) == []
    # and the rule itself: cut before the first pad_id, from position len(prompt)
    stub = copy.deepcopy(model)
    stub.decode = lambda z, n: nn.functional.one_hot(torch.tensor([7, 8, 9, 10, 11, 0, 12] + [13] * (n - 7))[:n],
                                                     V).float().expand(z.shape[0], n, V) * 50
    assert stub.sample([[], [1, 2]], 10, temperature=0) == [[7, 8, 9, 10, 11], [9, 10, 11]]
    assert stub.sample([[]], 10, temperature=0, pad_id=99) == [[7, 8, 9, 10, 11, 0, 12, 13, 13, 13]]


# ----------------------------------------------------------------------------- config and bookkeeping
@pytest.mark.parametrize("key,value", [("beta_schedule", "cosine"), ("ode_method", "rk5"), ("latent_dim", 0),
                                       ("free_bits", -1.0), ("latent_tokens", -1), ("beta_steps", 0)])
def test_validate_config_names_the_key(key, value):
    cfg = Config()
    cfg.model.family = "lflm"
    LFLM.validate_config(cfg)
    setattr(cfg.model.lflm, key, value)
    with pytest.raises(ConfigError, match=f"model.lflm.{key}"):
        LFLM.validate_config(cfg)


def test_validate_config_decoder_heads():
    cfg = Config()
    cfg.model.lflm.decoder.n_heads = 3
    with pytest.raises(ConfigError, match="model.lflm.decoder.dim"):
        LFLM.validate_config(cfg)


def test_parallel_hooks_and_flops():
    model = build()
    units = model.shard_units()
    assert units[0] is model.lstm and units[1:] == list(model.decoder.layers)
    assert model.tp_plan() is None and model.describe() == "ode=rk4"
    assert model.activation_stacks() == [(model.cfg.lflm.decoder, L + 2, False)]
    base = model.flops_per_token()
    more_steps = build(ode_steps=8).flops_per_token()
    mlp = sum(m.weight.numel() for m in model.ode.modules() if isinstance(m, nn.Linear))
    assert more_steps - base == pytest.approx(4 * 4 * 2 * mlp * 3 / L)  # 4 more rk4 steps of 4 evaluations
    assert build(adjoint=True).flops_per_token() > base > 6 * 32 * V
