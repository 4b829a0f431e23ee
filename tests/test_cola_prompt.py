"""Cola DLM follows its prompt: a small Cola model trained the demo's way (stage 1 VAE, then
stage 2 with the stage-1 statistics and a KL to the frozen stage-1 encoder) on a task where the
prompt decides the continuation (counting mod V) continues each prompt differently under one seed,
and its DiT's velocity depends on the clean history, in the training layout and in the sampler."""
import pytest
import torch

from lflm_dist.models.blocks import AttnMask
from lflm_dist.models.noise import sample_keys
from lflm_dist.models.registry import build_model
from test_models import L, V, cfg_for


def counting(b: int, g: torch.Generator) -> torch.Tensor:
    return (torch.randint(0, V, (b, 1), generator=g) + torch.arange(L)) % V


def _train(m, steps: int, g: torch.Generator) -> None:
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    for step in range(steps):
        out = m.loss({"input_ids": counting(16, g), "noise_key": sample_keys(0, step, 0, 16)})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        for mod in m.modules():  # as the engine does after each step: the VAE's and the mixture's statistics
            if hasattr(mod, "update_statistics"):
                mod.update_statistics()


# the prior of configs/cola_tiny.yaml: the token mixture and the history's tokens (docs/cola_ablation.md)
PRIORS = {"latents": (), "tokens": ("model.dit.token_mixture=true", "model.dit.history_tokens=true",
                                    "model.cola.lambda_token_ce=8")}


@pytest.fixture(scope="module", params=list(PRIORS))
def trained(request):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    common = ("model.vae.beta=0.01", "model.cola.latent_stats=track", *PRIORS[request.param])
    stage1 = build_model(cfg_for("model.cola.stage=1", *common).model)
    _train(stage1, 200, g)
    m = build_model(cfg_for("model.cola.stage=2", *common, "model.cola.lambda_ref=0.1",
                            "model.cola.ref_checkpoint=in-memory").model, init_pretrained=False)
    enc = {k[len("vae.encoder."):]: v for k, v in stage1.state_dict().items() if k.startswith("vae.encoder.")}
    m.load_state_dict({**m.state_dict(), **stage1.state_dict(), **{"ref_encoder." + k: v for k, v in enc.items()}})
    m.vae.track_latent_stats = False  # stage 2 keeps the stage-1 statistics, as model.cola.latent_stats=stage1 does
    _train(m, 300, g)
    return m.eval()


@pytest.mark.parametrize("churn", [0.0, 0.7])
def test_continuations_follow_their_prompts(trained, churn):
    """Same seed, four prompts: the continuations differ (positional agreement as low as between
    unrelated texts, where a prior that ignores its prompt gives ~1) and mostly continue the count,
    with the deterministic sampler and the stochastic one (sample.churn)."""
    prompts = [[(s + i) % V for i in range(8)] for s in (3, 40, 71, 90)]
    outs = [trained.sample([p], 16, steps=8, churn=churn, generator=torch.Generator().manual_seed(0))[0]
            for p in prompts]
    agree = [sum(a == b for a, b in zip(outs[i], outs[j])) / 16 for i in range(4) for j in range(i + 1, 4)]
    assert sum(agree) / len(agree) <= 0.15, outs
    right = sum(o[k] == (p[-1] + 1 + k) % V for p, o in zip(prompts, outs) for k in range(16)) / 64
    assert right >= 0.3, outs


@torch.no_grad()
def test_dit_velocity_depends_on_clean_history(trained):
    """The velocity of a noisy block moves toward its true continuation with the true history and
    away from it with another sample's: in the [clean | noisy] training layout and through the
    sampler's KV cache (the two must also agree)."""
    m = trained
    bs = m.cfg.dit.block_size
    seq = torch.stack([(s + torch.arange(L)) % V for s in (3, 40, 71, 90)])
    zn = m.vae.normalize(m.vae.encoder(seq)[0])
    target = zn[:, bs:2 * bs]
    t = 0.7
    xt = (1 - t) * target + t * torch.randn(target.shape, generator=torch.Generator().manual_seed(1))
    errs = {}
    for name, hist, toks in (("true", zn[:, :bs], seq[:, :bs]), ("other", zn[:, :bs].roll(1, 0), seq[:, :bs].roll(1, 0))):
        cache = m.dit.net.new_cache()
        m.dit.extend_history(cache, hist, 0, toks)
        v_cached = m.dit(xt, torch.full((4, 1), t), torch.arange(bs, 2 * bs), None, cache=cache, commit=False)
        x = torch.cat([hist, hist, xt, xt], 1)  # training layout over two blocks: noisy block 1 sees clean block 0
        tt = torch.tensor([[0.0, 0.0, t, t]]).expand(4, 4)
        unknown = torch.full_like(toks, -1)
        v_train = m.dit(x, tt, torch.arange(2 * bs).repeat(2), AttnMask("clean_noisy", 2 * bs, bs),
                        tokens=torch.cat([toks, toks, unknown, unknown], 1))[:, 2 * bs + bs:]
        torch.testing.assert_close(v_cached, v_train, rtol=1e-4, atol=1e-4)
        errs[name] = (xt - t * v_cached - target).pow(2).mean().item()  # error of the implied clean latent
    assert errs["true"] < 0.5 * errs["other"], errs
