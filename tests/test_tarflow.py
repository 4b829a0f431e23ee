"""TarFlowLM: the couplings are invertible with exact log-determinants (against autograd's
Jacobian), each block is autoregressive in its own direction, the mixture CDF is stable in the
tails, the ELBO on a toy source of known entropy comes close to that entropy, sampling follows its
prompt, editing a span changes what follows, progressive training freezes what it should, and bad
configs are clear errors. The character-level tokenizer the benchmark uses is here too."""
import json
import math

import pytest
import torch

from lflm_dist.config import ConfigError, load_config
from lflm_dist.data.tokenizer import Tokenizer
from lflm_dist.models.flow_couplings import (mixture_forward, mixture_inverse, rosenblatt_forward,
                                             rosenblatt_inverse)
from lflm_dist.models.registry import build_model

V, T = 6, 16


def blocks(*spec):
    return "model.tarflow.blocks=" + json.dumps([{"coupling": c, "n_layers": 1, "components": 4} for c in spec])


def make(*over, vocab=V, seq_len=T, seed=0):
    cfg = load_config(None, ["model.family=tarflow", f"model.vocab_size={vocab}", f"model.seq_len={seq_len}",
                             "model.tarflow.latent_dim=2", "model.tarflow.dim=32", "model.tarflow.n_heads=2",
                             *over])
    return build_model(cfg.model, seed=seed)


def flow(model, z):
    """z [B, T, d] -> (u [B, N, n], summed log|det| [B]) through the whole stack."""
    h, total = model._patches(z), 0.0
    for blk in model.blocks:
        h, ld = blk(h, model.codebook)
        total = total + ld
    return h, total


# ----------------------------------------------------------------------------- couplings
@pytest.mark.parametrize("spec", [("affine",), ("mix1",), ("rosenblatt",), ("rosenblatt", "mix1", "affine")])
def test_stack_is_invertible_and_its_log_det_is_autograds(spec):
    torch.manual_seed(0)
    model = make(blocks(*spec), seq_len=4).double()
    model.cfg.tarflow.inverse_tol = 1e-12
    z = torch.randn(1, 4, 2, dtype=torch.float64) * 1.5
    u, logdet = flow(model, z)
    z_back = model.invert(u)
    torch.testing.assert_close(z_back.double(), z, atol=1e-7, rtol=0)
    J = torch.autograd.functional.jacobian(lambda x: flow(model, x.view(1, 4, 2))[0].reshape(-1), z.reshape(-1))
    assert torch.linalg.slogdet(J)[1].item() == pytest.approx(logdet.item(), abs=1e-8)


@pytest.mark.parametrize("coupling", ["affine", "mix1", "rosenblatt"])
def test_each_block_is_autoregressive_in_its_direction(coupling):
    """u_t depends on h_<=t for a left-to-right block and on h_>=t for the right-to-left one (its
    dims in reverse order within a position); the Jacobian is triangular in that order."""
    specs = (coupling, "mix1") if coupling == "rosenblatt" else (coupling, coupling)
    model = make(blocks(*specs), seq_len=5).double()
    h = torch.randn(1, 5, 2, dtype=torch.float64)
    for blk, reverse in zip(model.blocks, (False, True)):
        J = torch.autograd.functional.jacobian(lambda x: blk(x.view(1, 5, 2), model.codebook)[0].reshape(-1),
                                               h.reshape(-1))
        order = torch.arange(10).flip(0) if reverse else torch.arange(10)  # position-major, dims inside
        Jo = J[order][:, order]
        assert torch.count_nonzero(torch.triu(Jo, diagonal=1)) == 0
        assert torch.count_nonzero(torch.tril(Jo, diagonal=-1)) > 0  # context does flow forward
        assert (torch.diagonal(Jo) > 0).all()


def test_mixture_cdf_is_stable_in_the_tails_and_inverts_there():
    x = torch.tensor([-400.0, -60.0, -8.0, 0.3, 9.0, 70.0, 500.0])
    logits, mean, log_scale = torch.zeros(7, 3), torch.tensor([[-1.0, 0.0, 2.0]] * 7), torch.zeros(7, 3)
    u, logdet = mixture_forward(x, logits, mean, log_scale)
    assert torch.isfinite(u).all() and torch.isfinite(logdet).all()
    assert (u.diff() > 0).all()  # still strictly monotone far out in both tails
    x_back = mixture_inverse(u, logits, mean, log_scale, tol=1e-7)
    torch.testing.assert_close(x_back, x, rtol=1e-5, atol=1e-5)
    # fp32 gradients stay finite where 1 - F(x) rounds to 0
    xg = x.clone().requires_grad_()
    g, = torch.autograd.grad(mixture_forward(xg, logits, mean, log_scale)[0].sum(), xg)
    assert torch.isfinite(g).all() and (g > 0).all()


def test_rosenblatt_density_is_the_codebook_mixture():
    """sum of log|J| = log sum_k pi_k N(x; mu_k, sigma_k^2 I) - log N(u; 0, I), and it inverts."""
    torch.manual_seed(1)
    mean, log_std = torch.randn(5, 3, dtype=torch.float64), 0.3 * torch.randn(5, 3, dtype=torch.float64)
    log_pi = torch.log_softmax(torch.randn(8, 5, dtype=torch.float64), -1)
    x = torch.randn(8, 3, dtype=torch.float64)
    u, logdet = rosenblatt_forward(x, log_pi, mean, log_std)
    comp = torch.distributions.Normal(mean, log_std.exp()).log_prob(x[:, None]).sum(-1)
    log_mix = torch.logsumexp(log_pi + comp, -1)
    std_normal = torch.distributions.Normal(0.0, 1.0).log_prob(u).sum(-1)
    torch.testing.assert_close(logdet.sum(-1), log_mix - std_normal)
    torch.testing.assert_close(rosenblatt_inverse(u, log_pi, mean, log_std, tol=1e-12), x, atol=1e-9, rtol=0)


# ----------------------------------------------------------------------------- the ELBO
def counting_source(n, seq_len=T, stay=0.9, seed=0):
    """x_0 uniform; x_t = x_{t-1} + 1 mod V with probability stay, else uniform."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(n, seq_len, dtype=torch.long)
    x[:, 0] = torch.randint(V, (n,), generator=g)
    for t in range(1, seq_len):
        keep = torch.rand(n, generator=g) < stay
        x[:, t] = torch.where(keep, (x[:, t - 1] + 1) % V, torch.randint(V, (n,), generator=g))
    return x


def counting_entropy_per_token(stay=0.9, seq_len=T):
    a, b = stay + (1 - stay) / V, (1 - stay) / V
    rate = -(a * math.log(a) + (V - 1) * b * math.log(b))
    return (math.log(V) + (seq_len - 1) * rate) / seq_len


@pytest.fixture(scope="module")
def counting_model():
    """Mix-d (a tied Rosenblatt block + a right-to-left Mix-1 block) trained on the counting source."""
    torch.manual_seed(0)
    model = make(blocks("rosenblatt", "mix1"))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(400):
        loss = model.loss({"input_ids": counting_source(32, seed=step + 1)})["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_elbo_approaches_the_entropy_of_a_known_source(counting_model):
    x = counting_source(512, seed=10_000)
    b = counting_model.nll_bound(x, generator=torch.Generator().manual_seed(0))
    per_token = b.nll.mean().item() / T
    h = counting_entropy_per_token()
    assert b.kind == "elbo_bound"
    assert per_token == pytest.approx(h, abs=0.1)  # 0.507 nats/token; a unigram model would pay log 6 = 1.79
    se = b.nll.std().item() / T / math.sqrt(512)
    assert per_token > h - 4 * se  # a bound: not below the entropy beyond Monte Carlo noise
    terms = sum(b.terms[k] for k in ("recon", "neg_entropy", "neg_log_prior"))
    torch.testing.assert_close(terms, b.nll)
    k8 = counting_model.nll_bound(x[:64], BoundSettingsK(8), generator=torch.Generator().manual_seed(0))
    assert k8.kind == "iwae_bound"


def BoundSettingsK(k):
    from lflm_dist.models.family import BoundSettings
    return BoundSettings(iwae_k=k)


def test_loss_is_the_mean_of_its_halves_with_keyed_noise():
    from lflm_dist.models.noise import sample_keys
    model = make(blocks("rosenblatt", "mix1"))
    x = counting_source(8)
    keys = sample_keys(0, 3, 0, 8)
    full = model.loss({"input_ids": x, "noise_key": keys})["loss"]
    halves = [model.loss({"input_ids": x[i:i + 4], "noise_key": keys[i:i + 4]})["loss"] for i in (0, 4)]
    torch.testing.assert_close(full, sum(halves) / 2)


# ----------------------------------------------------------------------------- generation and editing
def test_continuations_follow_their_prompts(counting_model):
    """Under one seed, prompts ending in different symbols continue differently, and continue the count."""
    outs = []
    for start in range(V):
        prompt = [(start + i) % V for i in range(6)]
        out = counting_model.sample([prompt], 8, generator=torch.Generator().manual_seed(0), pad_id=-1)[0]
        assert len(out) == 8
        outs.append(out)
        steps = list(zip([prompt[-1]] + out[:-1], out))
        counted = sum(b == (a + 1) % V for a, b in steps)  # the source counts on with probability 0.92
        assert counted >= 5 and out[0] == (prompt[-1] + 1) % V or counted >= 6, (prompt, out)
    agree = [sum(a == b for a, b in zip(outs[i], outs[j])) / 8 for i in range(V) for j in range(i + 1, V)]
    assert sum(agree) / len(agree) <= 0.2


def test_editing_a_span_changes_what_follows(counting_model):
    x = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3]])
    assert counting_model.reconstruct(x).tolist() == x.tolist()
    edited = counting_model.edit(x, 4, torch.tensor([[1, 2]]))  # ... 3 | 1 2 | ...
    assert edited[0, :6].tolist() == [0, 1, 2, 3, 1, 2]
    after = edited[0, 5:].tolist()  # from the span's last token on
    counted = sum(b == (a + 1) % V for a, b in zip(after[:-1], after[1:]))
    assert counted >= 7 and after[1] == 3, edited.tolist()


def test_patches_generate_block_wise_and_invert():
    model = make(blocks("mix1", "affine"), "model.tarflow.patch_size=4").double()
    model.cfg.tarflow.inverse_tol = 1e-12
    z = torch.randn(2, T, 2, dtype=torch.float64)
    u, _ = flow(model, z)
    assert u.shape == (2, T // 4, 8)
    torch.testing.assert_close(model.invert(u), z, atol=1e-6, rtol=0)
    out = model.float().sample([[1, 2, 3, 4, 5]], 10, generator=torch.Generator().manual_seed(0), pad_id=-1)
    assert len(out[0]) == 10
    assert model.eval_layout().block == 4


# ----------------------------------------------------------------------------- config errors
@pytest.mark.parametrize("over, message", [
    ([blocks("mix1", "rosenblatt")], "only the first block"),
    ([blocks("rosenblatt"), "model.tarflow.patch_size=2"], "needs model.tarflow.patch_size=1"),
    ([blocks("mix1"), "model.tarflow.frozen_blocks=1"], "frozen_blocks must be in [0, 1)"),
    ([blocks("mix1", "mix1"), "model.tarflow.frozen_blocks=1"], "needs model.tarflow.init_from"),
    (['model.tarflow.blocks=[{"coupling": "spline"}]'], "blocks.0.coupling must be one of"),
    ([blocks("mix1"), "model.tarflow.patch_size=3"], "must be a multiple of model.tarflow.patch_size"),
    (['model.tarflow.blocks=[{"coupling": "mix1", "layers": 2}]'], "did you mean model.tarflow.blocks.0.n_layers"),
])
def test_bad_tarflow_configs_are_clear_errors(over, message):
    with pytest.raises(ConfigError, match=None) as e:
        make(*over)
    assert message in str(e.value)


# ----------------------------------------------------------------------------- character tokenizer
def test_character_tokenizer_round_trips_and_names_unknown_characters(tmp_path):
    tok = Tokenizer.characters(["First Citizen:\nBefore we proceed"])
    ids = tok.encode("Before\nFirst")
    assert len(ids) == len("Before\nFirst") and tok.decode(ids) == "Before\nFirst" and tok.eos_id == 0
    tok.save(tmp_path / "t.json")
    again = Tokenizer.load(tmp_path / "t.json")
    assert again.encode("Citizen") == tok.encode("Citizen") and again.sha256 == tok.sha256
    with pytest.raises(ValueError, match=r"\['Z'\] are not in this character-level"):
        again.encode_batch(["one", "Zoo"])
