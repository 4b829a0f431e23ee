"""Model behaviour: block-causal masks, KV caches, learning on a small overfit, keyed noise,
deterministic sampling."""
import math

import pytest
import torch
import torch.nn.functional as F

from lflm_dist.config import load_config
from lflm_dist.models.blocks import block_causal_mask, clean_noisy_mask, sample_token
from lflm_dist.models.noise import sample_keys
from lflm_dist.models.registry import build_model

V, L = 97, 32


def cfg_for(*overrides):
    base = ["model.vocab_size=97", f"model.seq_len={L}", "model.vae.encoder.dim=32", "model.vae.decoder.dim=32",
            "model.vae.encoder.n_heads=2", "model.vae.decoder.n_heads=2", "model.dit.net.dim=32",
            "model.dit.net.n_heads=2", "model.dit.block_size=8", "model.cola.lambda_ref=0", "model.cola.latent_stats=identity",
            "model.ar.net.dim=32", "model.ar.net.n_heads=2"]
    return load_config(None, base + list(overrides))


def tokens(b=4, seed=0):
    return torch.randint(0, V, (b, L), generator=torch.Generator().manual_seed(seed))


def test_block_causal_mask_shape_and_semantics():
    m = block_causal_mask(8, 4)
    assert m[:4, :4].all() and m[4:, :].all() and not m[:4, 4:].any()
    assert torch.equal(block_causal_mask(5, 1), torch.tril(torch.ones(5, 5, dtype=torch.bool)))
    cn = clean_noisy_mask(8, 4)
    # noisy block 1 (rows 12..15) sees clean block 0 and itself, not clean block 1 nor noisy block 0
    assert cn[12:16, 0:4].all() and cn[12:16, 12:16].all()
    assert not cn[12:16, 4:8].any() and not cn[12:16, 8:12].any()
    assert not cn[:8, 8:].any()  # clean positions never see noisy ones


def perturb_after(x, pos):
    y = x.clone()
    y[:, pos:] = (y[:, pos:] + 1) % V
    return y


@pytest.mark.parametrize("block", [4, 8])
def test_vae_encoder_and_decoder_are_block_causal(block):
    torch.manual_seed(0)
    m = build_model(cfg_for(f"model.vae.block_size={block}", f"model.dit.block_size={block}").model).eval()
    x = tokens()
    b = 1  # perturb blocks >= b+1, outputs of blocks <= b must not move
    cut = (b + 1) * block
    mean_a, _ = m.vae.encoder(x)
    mean_b, _ = m.vae.encoder(perturb_after(x, cut))
    assert torch.allclose(mean_a[:, :cut], mean_b[:, :cut], atol=1e-6)
    assert not torch.allclose(mean_a[:, cut:], mean_b[:, cut:])
    # inside a block every token sees every other: changing the block's last token moves its first
    mean_c, _ = m.vae.encoder(perturb_after(x, cut - 1))
    assert not torch.allclose(mean_a[:, cut - block], mean_c[:, cut - block])
    z = torch.randn(2, L, 16)
    z2 = z.clone()
    z2[:, cut:] += 1.0
    assert torch.allclose(m.vae.decoder(z)[:, :cut], m.vae.decoder(z2)[:, :cut], atol=1e-5)


def test_dit_is_block_causal_and_noisy_block_sees_only_history():
    torch.manual_seed(0)
    m = build_model(cfg_for("model.cola.stage=2").model).eval()
    for p in m.dit.parameters():  # adaLN-Zero starts at v = 0; randomise so outputs depend on inputs
        torch.nn.init.normal_(p, std=0.1)
    bs = m.cfg.dit.block_size
    x = torch.randn(2, 2 * L, 16)
    t = torch.rand(2, 2 * L)
    pos = torch.arange(L).repeat(2)
    mask = clean_noisy_mask(L, bs)
    out = m.dit(x, t, pos, mask)
    y = x.clone()
    y[:, bs:L] += 1.0  # clean blocks >= 1
    out2 = m.dit(y, t, pos, mask)
    assert torch.allclose(out[:, :bs], out2[:, :bs], atol=1e-5)  # clean block 0
    assert torch.allclose(out[:, L:L + 2 * bs], out2[:, L:L + 2 * bs], atol=1e-5)  # noisy blocks 0, 1
    assert not torch.allclose(out[:, L + 2 * bs:], out2[:, L + 2 * bs:])  # noisy block 2 sees clean block 1


def test_kv_cached_decoding_matches_full_forward():
    torch.manual_seed(0)
    m = build_model(cfg_for().model).eval()
    z = torch.randn(2, L, 16)
    full = m.vae.decoder(z)
    cache = m.vae.decoder.net.new_cache()
    parts = [m.vae.decoder(z[:, i:i + 8], cache=cache) for i in range(0, L, 8)]
    assert torch.allclose(full, torch.cat(parts, 1), atol=1e-5)
    ar = build_model(cfg_for("model.family=ar").model).eval()
    x = tokens(2)
    full = ar.logits(x)
    cache = ar.net.new_cache()
    steps = [ar.logits(x[:, :5], cache)] + [ar.logits(x[:, i:i + 1], cache) for i in range(5, L)]
    assert torch.allclose(full, torch.cat(steps, 1), atol=1e-5)


def overfit(model, batch, steps, lr=3e-3):
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    hist = []
    for _ in range(steps):
        out = model.loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        hist.append({k: float(v.detach()) for k, v in out.items()})
    return hist


def test_vae_reconstruction_accuracy_rises_on_overfit():
    torch.manual_seed(0)
    m = build_model(cfg_for("model.vae.mask_prob=0.1").model)
    batch = {"input_ids": tokens(8), "noise_key": sample_keys(0, 0, 0, 8)}
    hist = overfit(m, batch, 120)
    assert hist[0]["recon_acc"] < 0.1
    assert hist[-1]["recon_acc"] > 0.9, hist[-1]
    assert hist[-1]["recon"] < 0.3 * hist[0]["recon"]


def test_dit_flow_matching_loss_falls():
    torch.manual_seed(0)
    m = build_model(cfg_for("model.cola.stage=2", "model.vae.beta=0.01").model)
    hist = overfit(m, {"input_ids": tokens(8)}, 150)
    first = sum(h["fm"] for h in hist[:10]) / 10
    last = sum(h["fm"] for h in hist[-10:]) / 10
    assert last < 0.7 * first, (first, last)


def test_denoised_ce_adds_a_token_loss_on_the_dits_clean_estimate():
    """model.cola.lambda_denoised_ce: the decoder's token CE of the DiT's z0_hat = z_t - t v. It draws
    no noise of its own (fm equal to the run without it), adds lambda x the term to the loss, is a
    per-sample mean (equal however a batch is split), and its gradient reaches the DiT."""
    torch.manual_seed(0)
    plain = build_model(cfg_for("model.cola.stage=2").model)
    m = build_model(cfg_for("model.cola.stage=2", "model.cola.lambda_denoised_ce=0.5").model)
    m.load_state_dict(plain.state_dict())
    x, keys = tokens(8), sample_keys(3, 7, 0, 8)
    a, b = plain.loss({"input_ids": x, "noise_key": keys}), m.loss({"input_ids": x, "noise_key": keys})
    assert torch.equal(a["fm"], b["fm"]) and "denoised_ce" not in a
    assert torch.allclose(b["loss"], a["loss"] + 0.5 * b["denoised_ce"], rtol=1e-6)
    halves = [m.loss({"input_ids": x[i:i + 4], "noise_key": keys[i:i + 4]})["denoised_ce"] for i in (0, 4)]
    assert torch.allclose(b["denoised_ce"], (halves[0] + halves[1]) / 2, rtol=1e-5)
    b["denoised_ce"].backward()
    assert m.dit.out.weight.grad.abs().sum() > 0  # zero-initialised output layer: v = 0, but not its gradient
    assert m.flops_per_token() > plain.flops_per_token()


@torch.no_grad()
@pytest.mark.parametrize("churn", [0.0, 0.7])
def test_token_mixture_velocity_transports_noise_to_its_mixture(churn):
    """dit.TokenMixtureHead's velocity is the exact probability-flow field of
    sum_k w_k N(mu_k, s2 I): integrating it from N(0, I) at t = 1 to t = 0 lands each sample near one
    mean, with the mixture's weights as frequencies and s2 as the spread around the means. (A wrong
    a_t or a missing (1 - t) factor sends the samples elsewhere or mixes the weights up.) The
    sampler's stochastic step (dit.flow_step with churn) must keep the same marginals: a wrong
    noise scale would widen or shrink the spread."""
    from lflm_dist.models.dit import TokenMixtureHead, flow_step
    head = TokenMixtureHead(4, 2, 3)
    head.means.copy_(torch.tensor([[3.0, 0.0], [-3.0, 0.0], [0.0, 4.0]]))
    head.var.fill_(0.05)
    w = torch.tensor([0.6, 0.3, 0.1])
    head.logits.bias.copy_(w.log())  # what a history would say; the weight is zero-initialised
    n, steps = 6000, 400
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, n, 2, generator=g)
    h = torch.zeros(1, n, 4)
    for i in range(steps):
        t = 1 - i / steps
        v, _ = head(h, x, torch.full((1, n), t))
        x = flow_step(x, v, t, 1 - (i + 1) / steps, churn, g)
    k = torch.cdist(x[0], head.means).argmin(1)
    freq = torch.bincount(k, minlength=3) / n
    torch.testing.assert_close(freq, w, atol=0.025, rtol=0)
    spread = (x[0] - head.means[k]).pow(2).mean()
    assert abs(spread.item() - 0.05) < 0.01, spread


def test_token_mixture_analytic_term_stays_fp32_under_bf16_autocast():
    """The mixture's log N(z_t; (1 - t) mu_k, var_t) term is ~w (z_t . mu_k) with w ~ 1 / s2: hundreds
    of nats near t = 0, where tokens are told apart by differences of a few. Under bf16 autocast
    (CUDA training) a bf16 matmul would round it by ~1 nat; it must match fp32 to rel 1e-5 (the
    network's own logits, a bf16 Linear like any LM head, are zero here)."""
    from lflm_dist.models.dit import TokenMixtureHead
    g = torch.Generator().manual_seed(0)
    head = TokenMixtureHead(8, 16, 50)
    head.means.copy_(torch.randn(50, 16, generator=g))
    head.var.fill_(0.02)
    x, h = torch.randn(2, 6, 16, generator=g), torch.randn(2, 6, 8, generator=g)
    t = torch.tensor([0.0, 0.01, 0.1, 0.5, 0.9, 1.0]).expand(2, 6)
    v32, logits32 = head(h, x, t)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v16, logits16 = head(h, x, t)
    assert logits32.abs().max() > 300  # the regime where rounding matters
    assert logits16.dtype == v16.dtype == torch.float32
    torch.testing.assert_close(logits16, logits32, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(v16, v32, rtol=1e-5, atol=1e-5)


def test_fused_mixture_mean_and_ce_matches_softmax_and_cross_entropy():
    """dit.mixture_mean_and_ce (one softmax, gradient in place) = softmax(l) @ mu and F.cross_entropy:
    values, and gradients by finite differences in fp64 (a sign or a missing <p, a> term fails)."""
    from lflm_dist.models.dit import mixture_mean_and_ce
    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(2, 5, 11, generator=g, dtype=torch.float64)).requires_grad_()
    mu = torch.randn(11, 3, generator=g, dtype=torch.float64).requires_grad_()
    y = torch.randint(0, 11, (2, 5), generator=g)
    m, ce = mixture_mean_and_ce(logits, mu, y)
    torch.testing.assert_close(m, logits.softmax(-1) @ mu)
    torch.testing.assert_close(ce, F.cross_entropy(logits.transpose(1, 2), y, reduction="none"))
    assert torch.autograd.gradcheck(lambda l, mu: mixture_mean_and_ce(l, mu, y), (logits, mu))


def test_token_mixture_adds_a_token_ce_on_the_prior():
    """dit.token_mixture: the DiT's velocity comes with logits of p(token | z_t, history); the loss adds
    lambda_token_ce x their CE (a per-sample mean: equal however a batch is split), the CE's
    gradient reaches the head, and the FLOPs count the head. The token means are the running
    means of each token's latents: after one step, exactly the step's per-token means."""
    torch.manual_seed(0)
    plain = build_model(cfg_for("model.cola.stage=2").model)
    m = build_model(cfg_for("model.cola.stage=2", "model.dit.token_mixture=true", "model.cola.lambda_token_ce=0.5").model)
    x, keys = tokens(8), sample_keys(3, 7, 0, 8)
    unweighted = build_model(cfg_for("model.cola.stage=2", "model.dit.token_mixture=true",
                                     "model.cola.lambda_token_ce=0").model)
    unweighted.load_state_dict(m.state_dict())
    out, a = m.loss({"input_ids": x, "noise_key": keys}), unweighted.loss({"input_ids": x, "noise_key": keys})
    assert torch.equal(out["fm"], a["fm"])
    assert torch.allclose(out["loss"], a["loss"] + 0.5 * out["token_ce"], rtol=1e-6)
    assert abs(out["token_ce"].item() - math.log(V)) < 0.5  # starts near uniform over the vocabulary
    halves = [m.loss({"input_ids": x[i:i + 4], "noise_key": keys[i:i + 4]})["token_ce"] for i in (0, 4)]
    assert torch.allclose(out["token_ce"], (halves[0] + halves[1]) / 2, rtol=1e-5)
    out["token_ce"].backward()
    assert m.dit.tokens.logits.weight.grad.abs().sum() > 0
    assert m.flops_per_token() > plain.flops_per_token()
    head = m.dit.tokens
    head._sums = None
    z = torch.randn(8, L, m.cfg.vae.latent_dim, generator=torch.Generator().manual_seed(1))
    head.accumulate(z[:4], x[:4])
    head.accumulate(z[4:], x[4:])  # two micro-batches of one step
    head.update_statistics()
    k = int(x[0, 0])
    torch.testing.assert_close(head.means[k], z[x == k].mean(0))
    assert head.counts[k] == (x == k).sum() and head.means[(torch.bincount(x.flatten(), minlength=V) == 0)].abs().sum() == 0


def test_keyed_noise_makes_loss_independent_of_batch_split():
    torch.manual_seed(0)
    m = build_model(cfg_for("model.cola.stage=2", "model.vae.mask_prob=0.2").model)
    x, keys = tokens(8), sample_keys(3, 7, 0, 8)
    whole = m.loss({"input_ids": x, "noise_key": keys})
    halves = [m.loss({"input_ids": x[i:i + 4], "noise_key": keys[i:i + 4]}) for i in (0, 4)]
    for k in ("recon", "fm", "neg_entropy"):
        assert torch.allclose(whole[k], (halves[0][k] + halves[1][k]) / 2, rtol=1e-5, atol=1e-6), k
    other = m.loss({"input_ids": x, "noise_key": sample_keys(4, 7, 0, 8)})
    assert not torch.allclose(whole["fm"], other["fm"])


@pytest.mark.parametrize("family,extra,churn", [("cola", ["model.cola.stage=2"], 0.0),
                                               ("cola", ["model.cola.stage=2"], 0.7), ("ar", [], 0.0)])
def test_sampling_is_deterministic_under_a_seed(family, extra, churn):
    torch.manual_seed(0)
    m = build_model(cfg_for(f"model.family={family}", *extra).model)
    prompts = [[1, 2, 3], [5]]

    def run(seed):
        return m.sample(prompts, 20, steps=4, guidance=2.0, churn=churn, top_k=10, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a == b
    assert a != c
    assert [len(s) for s in a] == [20, 20]
    assert all(0 <= t < V for s in a for t in s)


def test_top_k_top_p_restrict_support():
    logits = torch.tensor([[5.0, 4.0, 1.0, 0.0, -1.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample_token(logits, 1.0, top_k=2, generator=g).tolist()) <= {0, 1}
    assert set(sample_token(logits, 1.0, top_p=0.5, generator=g).tolist()) == {0}
    assert sample_token(logits, 0.0).eq(0).all()


# ----------------------------------------------------------------------------- attention backends
def _random_dit(m):
    for p in m.dit.parameters():  # adaLN-Zero starts the DiT at zero; give its attention something to do
        torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
    return m


def _loss_and_grads(model, backend, batch):
    import copy
    from lflm_dist.models.blocks import set_attention_backend
    m = copy.deepcopy(model)
    set_attention_backend(m, backend)
    terms = m.loss(batch)
    terms["loss"].backward()
    return terms["loss"].detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["cola", "ar"])
def test_sdpa_backend_equals_dense_reference_in_loss_and_grads(family):
    """`sdpa` (is_causal for the AR model, no mask tensor) against the dense-mask reference."""
    torch.manual_seed(0)
    m = build_model(cfg_for(f"model.family={family}", "model.cola.stage=2", "model.dit.cfg_drop_prob=0.5").model)
    m = _random_dit(m) if family == "cola" else m
    batch = {"input_ids": tokens(), "noise_key": sample_keys(0, 0, 0, 4)}
    loss_d, grads_d = _loss_and_grads(m, "dense", batch)
    loss_s, grads_s = _loss_and_grads(m, "sdpa", batch)
    torch.testing.assert_close(loss_s, loss_d, rtol=1e-6, atol=1e-6)
    for n, g in grads_d.items():
        torch.testing.assert_close(grads_s[n], g, rtol=1e-5, atol=1e-6, msg=n)


def test_flex_backend_equals_dense_reference_forward_on_cpu():
    """FlexAttention with a BlockMask, every mask kind (block-causal, causal, the DiT's 2L layout
    with per-sample history dropout and as KV-cached rows), gives the dense path's losses and
    outputs. Its backward exists on CUDA only: tests/test_cuda.py checks gradients there."""
    from lflm_dist.models.blocks import AttnMask, flex_attention
    torch.manual_seed(0)
    drop = torch.tensor([True, False, True, False])
    for mask in (AttnMask("block_causal", 40, 4), AttnMask("block_causal", 40, 1, q_start=17),
                 AttnMask("clean_noisy", 40, 8, drop_history=drop), AttnMask("clean_noisy", 40, 8, q_start=40)):
        q = torch.randn(4, 2, mask.q_len, 16)
        k, v = torch.randn(4, 2, mask.kv_len, 16), torch.randn(4, 2, mask.kv_len, 16)
        dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense())
        torch.testing.assert_close(flex_attention(q, k, v, mask.block_mask("cpu")), dense, rtol=1e-5, atol=1e-5)
    m = _random_dit(build_model(cfg_for("model.cola.stage=2", "model.dit.cfg_drop_prob=0.5").model))
    batch = {"input_ids": tokens(), "noise_key": sample_keys(0, 0, 0, 4)}
    import copy
    from lflm_dist.models.blocks import set_attention_backend
    out = {}
    with torch.no_grad():
        for backend in ("dense", "flex"):
            mm = copy.deepcopy(m)
            set_attention_backend(mm, backend)
            out[backend] = mm.loss(batch)
    for k in ("fm", "recon", "loss"):
        torch.testing.assert_close(out["flex"][k], out["dense"][k], rtol=1e-5, atol=1e-6)


def test_flex_backend_refuses_to_train_on_cpu():
    m = build_model(cfg_for("model.attention=flex").model)
    with pytest.raises(RuntimeError, match="model.attention=flex trains on CUDA only"):
        m.loss({"input_ids": tokens(), "noise_key": sample_keys(0, 0, 0, 4)})


def test_adaln_per_block_equals_per_position():
    """The DiT computes its adaLN modulation once per block (t is constant over a block); fed
    the same t per position it must give the same velocity."""
    from lflm_dist.models.blocks import AttnMask
    m = _random_dit(build_model(cfg_for("model.cola.stage=2").model)).eval()
    bs = m.dit.cfg.block_size
    x = torch.randn(2, 2 * L, 16)
    t_block = torch.cat([torch.zeros(2, L // bs), torch.rand(2, L // bs)], 1)
    mask, pos = AttnMask("clean_noisy", L, bs), torch.arange(L).repeat(2)
    per_block = m.dit(x, t_block, pos, mask)
    per_position = m.dit(x, t_block.repeat_interleave(bs, 1), pos, mask)
    torch.testing.assert_close(per_block, per_position, rtol=1e-5, atol=1e-6)
    assert per_block.abs().mean() > 1e-3  # the DiT is not the zero field


def test_adaln_once_per_distinct_t_equals_per_position():
    """With t per position (the release's random block sizes and prompts inside blocks), the DiT
    embeds t and computes each layer's adaLN once per distinct t and looks the rows up: the loss
    and every parameter's gradient must equal the per-position computation's."""
    m = _random_dit(build_model(cfg_for("model.cola.stage=2", "model.dit.random_block_size=true",
                                        "model.dit.prompt_in_block_prob=0.5").model))
    batch = {"input_ids": torch.randint(0, V - 1, (4, L)), "noise_key": sample_keys(3, 1, 0, 4)}
    out = {}
    for dedup in (True, False):
        m.dit.dedup_t = dedup
        m.zero_grad()
        loss = m(batch)["loss"]
        loss.backward()
        out[dedup] = (loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-6)
    assert out[True][1].keys() == out[False][1].keys()
    for n, g in out[True][1].items():
        torch.testing.assert_close(g, out[False][1][n], rtol=1e-4, atol=1e-6, msg=n)


def test_cpu_fast_paths_equal_the_reference_formulas():
    """The hand-written CPU autograd functions and the complex-number RoPE against the plain
    formulas they replace: RMSNorm (forward bit-identical, on a strided QK view too), SwiGLU
    (bit-identical both ways), RoPE as the rotation of interleaved pairs."""
    from lflm_dist.models import blocks
    torch.manual_seed(0)
    qkv = torch.randn(3, 10, 3, 2, 8, requires_grad=True)
    for x in (qkv[:, :, 0], torch.randn(3, 10, 16, requires_grad=True)):
        w = (torch.rand(x.shape[-1]) + 0.5).requires_grad_()
        ref = blocks.rms_norm_reference(x, w, 1e-6)
        fast = blocks._RMSNormFn.apply(x, w, 1e-6)
        assert torch.equal(fast, ref)
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(fast, (x, w), g), torch.autograd.grad(ref, (x, w), g)):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    h = torch.randn(3, 10, 12, requires_grad=True)
    a, b = h.chunk(2, dim=-1)
    ref, fast = torch.nn.functional.silu(a) * b, blocks._SwiGLUFn.apply(h)
    assert torch.equal(fast, ref)
    g = torch.randn_like(ref)
    assert torch.equal(torch.autograd.grad(fast, h, g)[0], torch.autograd.grad(ref, h, g)[0])
    x, pos = torch.randn(2, 10, 3, 8), torch.arange(5, 15)
    ang = pos[:, None, None].float() * 10000.0 ** (-torch.arange(0, 8, 2) / 8)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    pairs = torch.stack([x1 * ang.cos() - x2 * ang.sin(), x1 * ang.sin() + x2 * ang.cos()], -1).flatten(-2)
    torch.testing.assert_close(blocks.apply_rope(x, blocks.rope_freqs(pos, 8, 10000.0)), pairs, rtol=1e-5, atol=1e-6)


def test_dit_keep_from_equals_full_forward():
    """The flow-matching loss runs the DiT with keep_from=L (its last block computes only the
    noisy half); that half must equal the full forward's, outputs and parameter grads, with
    per-sample history dropout (dense masks cached per rule)."""
    from lflm_dist.models.blocks import AttnMask
    m = _random_dit(build_model(cfg_for("model.cola.stage=2").model))
    bs = m.dit.cfg.block_size
    x, t = torch.randn(3, 2 * L, 16), torch.rand(3, 2 * L // bs)
    mask = AttnMask("clean_noisy", L, bs, drop_history=torch.tensor([True, False, True]))
    for rule in (mask, AttnMask("clean_noisy", L, bs, q_start=L, drop_history=mask.drop_history)):
        q, kv = torch.arange(rule.q_start, 2 * L)[None, :, None], torch.arange(2 * L)[None, None]
        assert torch.equal(rule.dense(), rule.allowed(torch.arange(3)[:, None, None], q, kv)[:, None])
    pos = torch.arange(L).repeat(2)
    full = m.dit(x, t, pos, mask)[:, L:]
    part = m.dit(x, t, pos, mask, keep_from=L)
    torch.testing.assert_close(part, full, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(full)
    params = [p for p in m.dit.parameters()]
    for a, b in zip(torch.autograd.grad(part, params, g), torch.autograd.grad(full, params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- the release's recipe
RECIPE = ("model.cola.stage=2", "model.dit.random_block_size=true", "model.dit.prompt_in_block_prob=0.5")


def test_per_sample_block_sizes_give_each_sample_its_own_rule():
    """AttnMask with a block size per sample: its dense form is, sample by sample, the rule of
    that sample's block size (with its history dropout), and FlexAttention agrees with it."""
    from lflm_dist.models.blocks import AttnMask, flex_attention
    blk, drop = torch.tensor([1, 2, 8, 4]), torch.tensor([False, True, False, False])
    for kind in ("clean_noisy", "block_causal"):
        mask = AttnMask(kind, 16, blk, drop_history=drop if kind == "clean_noisy" else None)
        dense = mask.dense()
        assert dense.shape == (4, 1, mask.q_len, mask.kv_len)
        for i in range(4):
            one = AttnMask(kind, 16, int(blk[i]), drop_history=drop[i:i + 1] if kind == "clean_noisy" else None)
            assert torch.equal(dense[i, 0], one.dense().reshape(mask.q_len, mask.kv_len)), (kind, i)
        q, k, v = torch.randn(4, 2, mask.q_len, 8), torch.randn(4, 2, mask.kv_len, 8), torch.randn(4, 2, mask.kv_len, 8)
        ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=dense)
        torch.testing.assert_close(flex_attention(q, k, v, mask.block_mask("cpu")), ref, rtol=1e-5, atol=1e-5)


def test_release_recipe_loss_is_split_invariant_and_ignores_given_prompt_parts():
    """Random block sizes and clean prompt parts inside blocks: the loss is still a per-sample sum
    (equal however the batch is split), draws several block sizes, and the given (clean) positions
    are not in the loss: changing the DiT's output there changes nothing."""
    torch.manual_seed(0)
    m = _random_dit(build_model(cfg_for(*RECIPE, "model.dit.prompt_in_block_prob=1.0").model))
    x, keys = tokens(8), sample_keys(3, 7, 0, 8)
    whole = m.loss({"input_ids": x, "noise_key": keys})
    halves = [m.loss({"input_ids": x[i:i + 4], "noise_key": keys[i:i + 4]}) for i in (0, 4)]
    torch.testing.assert_close(whole["fm"], (halves[0]["fm"] + halves[1]["fm"]) / 2, rtol=1e-5, atol=1e-6)
    seen = []
    orig = m.dit.forward

    def spy(x_, t, pos, mask, **kw):  # records the rule and t the loss used, returns the real output
        seen.append((mask, t))
        return orig(x_, t, pos, mask, **kw)

    m.dit.forward = spy
    m.loss({"input_ids": x, "noise_key": keys})
    mask, t = seen[-1]
    assert len(set(mask.block.tolist())) > 1 and set(mask.block.tolist()) <= {1, 2, 4, 8}
    clean = t[:, L:] == 0
    assert clean.any() and not clean.all()
    assert set(clean.sum(1).tolist()) != {0}  # every sample with blocks > 1 has given parts

    def poisoned(x_, t_, pos, mask_, **kw):  # garbage velocity on the given positions only
        out = orig(x_, t_, pos, mask_, **kw)
        return torch.where((t_[:, L:] == 0)[..., None], out + 100.0, out)

    m.dit.forward = poisoned
    torch.testing.assert_close(m.loss({"input_ids": x, "noise_key": keys})["fm"], whole["fm"])


def test_prompt_of_any_length_continues_without_eos_padding():
    """With prompt_in_block_prob, a prompt that ends inside a DiT block is continued inside that
    block: the encoder sees the prompt and nothing else (no EOS padding), the DiT's KV cache holds
    the prompt's whole blocks, and the sampler returns max_new_tokens new tokens."""
    torch.manual_seed(0)
    m = build_model(cfg_for(*RECIPE).model)
    bs = m.cfg.dit.block_size
    seen = []
    m.vae.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    for n in (3, bs, bs + 5, 2 * bs + 1):
        prompt = [(7 * i) % (V - 1) + 1 for i in range(n)]  # no EOS (0) anywhere
        seen.clear()
        out = m.sample([prompt], 12, steps=2, generator=torch.Generator().manual_seed(0))
        assert len(out[0]) == 12
        assert seen[0].tolist() == [prompt], n  # the prompt alone, unpadded
    # a model trained without in-block prompts still pads to whole blocks (what it has seen)
    plain = build_model(cfg_for("model.cola.stage=2").model)
    plain.vae.encoder.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].clone()))
    seen.clear()
    plain.sample([[5, 6, 7]], 4, steps=2, generator=torch.Generator().manual_seed(0))
    assert seen[0].shape[1] == bs and seen[0][0, :bs - 3].eq(0).all()
