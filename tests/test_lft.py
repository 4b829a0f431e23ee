"""Latent Flow Transformer: the flow layer, Flow Walking, the recoupling ratio and the student,
on tiny randomly initialised Hugging Face teachers (Llama, GPT-NeoX, GPT-2) saved to disk."""
import math

import pytest
import torch

from lflm_dist.config import ConfigError, load_config
from lflm_dist.eval.lft_metrics import kl_and_ppl, recoupling_ratio, recoupling_table, skip_baselines, student_rows
from lflm_dist.models.lft_layers import integrate
from lflm_dist.models.noise import sample_keys
from lflm_dist.models.registry import build_model

VOCAB = 384  # the tiny_data tokenizer's size


def save_tiny_teacher(path, arch: str = "llama", vocab: int = VOCAB, layers: int = 6):
    import transformers as T
    torch.manual_seed(0)
    common = dict(vocab_size=vocab, num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=128)
    if arch == "llama":
        cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_key_value_heads=2, tie_word_embeddings=True,
                            **common)
        lm = T.LlamaForCausalLM(cfg)
    elif arch == "gpt_neox":
        lm = T.GPTNeoXForCausalLM(T.GPTNeoXConfig(hidden_size=64, intermediate_size=128, **common))
    else:
        lm = T.GPT2LMHeadModel(T.GPT2Config(vocab_size=vocab, n_layer=layers, n_head=4, n_embd=64, n_positions=128))
    lm.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    return {a: save_tiny_teacher(root / a, a) for a in ("llama", "gpt_neox", "gpt2")}


def lft_model(teacher, *overrides, seq_len=32):
    cfg = load_config(None, [f"model.family=lft", f"model.lft.teacher={teacher}", f"model.seq_len={seq_len}",
                             f"model.vocab_size={VOCAB}", *overrides])
    return build_model(cfg.model).eval()


def tokens(n=3, T=32, seed=1):
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------- Flow Walking
def test_integrate_follows_a_known_flow_and_flow_walking_loss_separates_fields():
    """Toy pairing x1 = 2 x0, joined by the curved flow x(t) = 2^t x0, i.e. v(x, t) = x ln 2:
    walking k = 3 random sorted steps with the true field lands near x1 (midpoint closer than
    Euler), many Euler steps converge, the zero field is off by the whole update (NMSE 1) and
    a wrong field is far off."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 7, 3, generator=g)
    x1 = 2 * x0
    true_v = lambda x, t: x * math.log(2)  # noqa: E731
    nmse = lambda y: float((y - x1).pow(2).sum() / (x1 - x0).pow(2).sum())  # noqa: E731
    times = torch.sort(torch.rand(5, 2, generator=g), -1).values
    walk_times = torch.cat([torch.zeros(5, 1), times, torch.ones(5, 1)], 1)  # k = 3 random sorted steps
    assert nmse(integrate(true_v, x0, walk_times, "midpoint")) < 1e-2
    assert nmse(integrate(true_v, x0, torch.linspace(0, 1, 257), "euler")) < 1e-4
    assert nmse(integrate(true_v, x0, walk_times, "midpoint")) < nmse(integrate(true_v, x0, walk_times, "euler"))
    assert nmse(integrate(lambda x, t: torch.zeros_like(x), x0, walk_times)) == pytest.approx(1.0)
    assert nmse(integrate(lambda x, t: 2 * x, x0, walk_times, "midpoint")) > 0.5  # a wrong field


def test_flow_walking_training_fits_a_pairing(teachers):
    """The family's Flow Walking loss, minimised on one batch, goes down (and its terms are logged)."""
    model = lft_model(teachers["llama"], "model.lft.block_start=1", "model.lft.block_end=4",
                      "model.lft.objective=flow_walking", "model.lft.alpha_fm=0.01").train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    batch = {"input_ids": tokens(4)}
    first = None
    for _ in range(30):
        out = model.loss(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        first = first or float(out["walk"])
    assert set(out) == {"loss", "walk", "fm"}
    assert float(out["walk"]) < 0.5 * first
    assert all(p.grad is None for p in model.teacher.parameters())  # the teacher stays frozen


def test_pair_cache_gives_the_teachers_states(teachers):
    """Sequences seen before come from the cache (all, some or none of a batch), with the arguments
    of layer m for the whole batch, equal to a teacher forward; the budget caps what is kept."""
    model = lft_model(teachers["llama"], "model.lft.block_start=1", "model.lft.block_end=4", "model.lft.pair_cache_gb=1")
    x = tokens(4)
    ref = model._teacher_capture(x)
    full = model.flops_per_token()
    model.block_states(x[:2])  # two of the four cached
    assert model.flops_per_token() == full  # the teacher ran through layers 0..n-1 for each
    flops = []
    for _ in range(2):  # then some, then all from the cache
        got = model.block_states(x)
        flops.append(model.flops_per_token())
        torch.testing.assert_close(got.x0, ref.x0, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.x1, ref.x1, rtol=1e-6, atol=1e-5)
        assert got.kwargs["position_embeddings"][0].shape == ref.kwargs["position_embeddings"][0].shape
    assert len(model._pair_cache) == 4
    # FLOPs count the teacher work done: half new, layers 0..3 for that half; all cached, no teacher
    # layer (layer m's arguments stop the forward at its input), the flow layer's 3 x forward alone
    # (counting the teacher gave an MFU above 1)
    assert flops[1] == pytest.approx(3 * model._layer_flops[1]) and flops[1] < full
    assert flops[0] == pytest.approx((full + flops[1]) / 2)
    small = lft_model(teachers["llama"], "model.lft.block_start=1", "model.lft.block_end=4", "model.lft.pair_cache_gb=1e-5")
    small.block_states(x)
    assert 0 < len(small._pair_cache) < 4  # 10.7 kB: one sequence's pair is 16 kB


def test_token_loss_norm_weighs_every_position_alike(teachers):
    """A massive first token (Llama teachers' attention sink) holds nearly all of a sequence's
    update energy: per sequence, missing every other token's update costs almost nothing; per
    token, it costs their share of the positions. The floor (1% of the median) leaves them be."""
    block = ("model.lft.block_start=1", "model.lft.block_end=4")
    per = {n: lft_model(teachers["llama"], *block, f"model.lft.loss_norm={n}") for n in ("sequence", "token", "both")}
    u = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(0))
    u[:, 0] *= 1000
    pred = u.clone()
    pred[:, 1:] = 0  # the update of every token but the first missed entirely
    assert float(per["sequence"]._nmse(pred, u, u)) < 1e-4
    assert float(per["token"]._nmse(pred, u, u)) == pytest.approx(7 / 8)
    assert float(per["both"]._nmse(pred, u, u)) == pytest.approx(7 / 16, rel=1e-3)
    missed_first = u.clone()
    missed_first[:, 0] = 0  # the massive token missed: per token only 1/8 of the loss, per sequence nearly all
    assert float(per["token"]._nmse(missed_first, u, u)) == pytest.approx(1 / 8)
    assert float(per["both"]._nmse(missed_first, u, u)) == pytest.approx((1 + 1 / 8) / 2, rel=1e-3)
    for model in per.values():  # a batch's loss is the mean of its halves' (2 DDP ranks = 1 process)
        err = torch.randn_like(u)
        whole = model._nmse(u + err, u, u)
        halves = (model._nmse(u[:1] + err[:1], u[:1], u[:1]) + model._nmse(u[1:] + err[1:], u[1:], u[1:])) / 2
        torch.testing.assert_close(whole, halves)
    with pytest.raises(ConfigError, match="model.lft.loss_norm"):
        lft_model(teachers["llama"], *block, "model.lft.loss_norm=global")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_logits_kl_term_is_the_judged_kl_and_training_on_it_lowers_it(teachers, arch):
    """lft.kl_weight's term, scored at every position, is the KL the student is judged by
    (lft_metrics.kl_and_ppl of teacher and student log-probs): at the one-step student's x1_hat
    (flow matching at t = 0) it equals the evaluation's KL, at x1 it is 0; at a subset of positions
    a batch's term is the mean of its halves'. Minimised on one batch (with Flow Walking) it falls."""
    block = ("model.lft.block_start=1", "model.lft.block_end=4")
    model = lft_model(teachers[arch], *block, "model.lft.kl_weight=1", "model.lft.kl_tokens=0", "model.lft.t0_frac=1")
    x = tokens(3)
    with torch.no_grad():
        model.flow.field.ada.bias.normal_(0, 0.3)  # a flow layer that is not the copied layer
        teacher_lp = model.teacher(input_ids=x).logits.float().log_softmax(-1)
        student_lp = model.logits(x).float().log_softmax(-1)
        judged = kl_and_ppl(teacher_lp, student_lp, x)["kl"]
        assert judged > 1e-3
        out = model.loss({"input_ids": x})
        assert float(out["kl"]) == pytest.approx(judged, rel=1e-4)
        cap = model._teacher_capture(x)
        assert float(model._logits_kl(x, cap.x1, cap.x1, None)) == pytest.approx(0, abs=1e-6)
        part = lft_model(teachers[arch], *block, "model.lft.kl_weight=1", "model.lft.kl_tokens=5")
        part.load_state_dict(model.state_dict())
        keys = sample_keys(0, 0, 0, 3)
        whole = part.loss({"input_ids": x, "noise_key": keys})["kl"]
        halves = [part.loss({"input_ids": x[i:j], "noise_key": keys[i:j]})["kl"] for i, j in ((0, 1), (1, 3))]
        torch.testing.assert_close(whole, (halves[0] + 2 * halves[1]) / 3)
    fw = lft_model(teachers[arch], *block, "model.lft.objective=flow_walking", "model.lft.kl_weight=1").train()
    opt = torch.optim.Adam([p for p in fw.parameters() if p.requires_grad], lr=3e-3)
    kls = []
    torch.manual_seed(0)  # the walk's times (no noise keys: torch's RNG)
    for _ in range(25):
        out = fw.loss({"input_ids": x})
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        kls.append(float(out["kl"]))
    assert set(out) == {"loss", "walk", "fm", "kl"}
    assert kls[-1] < 0.5 * kls[0]
    assert all(p.grad is None for p in fw.teacher.parameters())
    with pytest.raises(ConfigError, match="model.lft.kl_weight"):
        lft_model(teachers[arch], *block, "model.lft.kl_weight=-1")


# ---------------------------------------------------------------------------- recoupling ratio
def test_recoupling_ratio_of_constructed_pairings():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(64, 8, generator=g) * 10
    assert recoupling_ratio(x0, x0 + 0.01 * torch.randn(64, 8, generator=g)) == 0.0  # identity
    x1 = x0.clone()
    perm = torch.arange(64)
    for i in range(0, 24, 2):  # swap 12 pairs: 24 of 64 states matched to another's successor
        perm[i], perm[i + 1] = perm[i + 1].item(), perm[i].item()
    assert recoupling_ratio(x0, x1[perm]) == pytest.approx(24 / 64)


# ---------------------------------------------------------------------------- the student
@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "gpt2"])
def test_student_equals_teacher_when_nothing_is_replaced(teachers, arch):
    """An empty block leaves the teacher as it is; a block of one layer replaced by the untrained
    flow layer (a copy of that layer, adaLN at zero) with one Euler step is that layer again."""
    x = tokens()
    empty = lft_model(teachers[arch], "model.lft.block_start=2", "model.lft.block_end=2")
    with torch.no_grad():
        teacher = empty.teacher(input_ids=x).logits
        assert torch.equal(empty.logits(x), teacher)
        one = lft_model(teachers[arch], "model.lft.block_start=2", "model.lft.block_end=3")
        torch.testing.assert_close(one.logits(x), teacher, rtol=1e-5, atol=1e-5)
        two = lft_model(teachers[arch], "model.lft.block_start=2", "model.lft.block_end=4")
        assert (two.logits(x) - teacher).abs().max() > 1e-3  # replacing two layers by one changes it


def test_student_generates_through_transformers_and_scores_exactly(teachers):
    model = lft_model(teachers["llama"], "model.lft.block_start=1", "model.lft.block_end=4", "model.lft.steps=2")
    prompt = tokens(1, 6)
    with torch.no_grad(), model.student() as student:
        hf = student.generate(prompt, max_new_tokens=5, do_sample=False)[0, 6:].tolist()  # use_cache off inside
        with pytest.raises(RuntimeError, match="use_cache=False"):
            student.generate(prompt, max_new_tokens=2, do_sample=False, use_cache=True)
    ours = model.sample([prompt[0].tolist()], 5, temperature=0)[0]
    assert ours == hf
    x = tokens(2)
    b = model.nll_bound(x)
    assert b.kind == "exact" and b.token_nll.shape == (2, 31)
    torch.testing.assert_close(b.nll, b.token_nll.sum(-1))
    with torch.no_grad():
        lp = model.logits(x).float().log_softmax(-1)
    assert kl_and_ppl(lp, lp, x)["kl"] == pytest.approx(0.0, abs=1e-6)


def test_skip_baselines_and_student_rows(teachers):
    model = lft_model(teachers["llama"], "model.lft.block_start=1", "model.lft.block_end=4")
    x = tokens(4)
    skips = skip_baselines(model.teacher, x, 1, [1, 2, 3], batch=2)
    assert [r["layers_removed"] for r in skips] == [1, 2, 3] and all(r["kl"] > 0 for r in skips)
    rows = student_rows(model, x, [1, 2], batch=2)
    assert [r["steps"] for r in rows] == [1, 2] and all(r["nmse"] > 0 and r["kl"] > 0 for r in rows)
    # k = 1 at init is the copied layer 1 alone: the same as skipping layers 2 and 3
    assert rows[0]["kl"] == pytest.approx(skip_baselines(model.teacher, x, 2, [2], batch=2)[0]["kl"], rel=1e-4)


def test_block_table_skip_kl_is_the_skip_baseline_of_each_block(teachers):
    model = lft_model(teachers["llama"], "model.lft.block_start=1", "model.lft.block_end=4")
    x = tokens(4)
    rows = recoupling_table(model.teacher, x, [(1, 3), (2, 5), (0, 6)], states=32, skip_kl=True, batch=2)
    assert [r["block"] for r in rows] == ["[1,3)", "[2,5)", "[0,6)"]
    for (m, n), r in zip([(1, 3), (2, 5)], rows):
        assert r["skip_kl"] == pytest.approx(skip_baselines(model.teacher, x, m, [n - m], batch=2)[0]["kl"], rel=1e-5)
        assert 0 <= r["recoupling"] <= 1 and r["update_over_state"] > 0
    assert rows[2]["skip_kl"] > rows[0]["skip_kl"] > 0  # all layers gone: the most to restore
    assert "skip_kl" not in recoupling_table(model.teacher, x, [(1, 3)], states=32)[0]


def test_config_errors_name_the_key(teachers, tmp_path):
    with pytest.raises(ConfigError, match="model.lft.teacher"):
        lft_model(tmp_path / "absent")
    with pytest.raises(ConfigError, match="block_start/block_end"):
        lft_model(teachers["llama"], "model.lft.block_start=4", "model.lft.block_end=9")
    block = ("model.lft.block_start=1", "model.lft.block_end=3")
    with pytest.raises(ConfigError, match="model.lft.objective"):
        lft_model(teachers["llama"], *block, "model.lft.objective=walk")
    with pytest.raises(ConfigError, match="tokenizer has"):
        lft_model(teachers["llama"], *block, f"model.vocab_size={VOCAB + 1}")


def test_bench_shuffled_copy_reorders_paragraphs_reproducibly():
    # bench/lft_smollm2.py --shuffled-copy: the same paragraphs, a seeded order, WikiText's layout
    from conftest import load_script
    bench = load_script("bench/lft_smollm2.py")
    text = " \n = Title = \n \n" + "".join(f" paragraph {i} . \n \n" for i in range(40))
    out = bench.shuffled_paragraphs(text)
    lines = [line for line in text.split("\n") if line.strip()]
    got = [line for line in out.split("\n") if line.strip()]
    assert sorted(got) == sorted(lines) and got != lines
    assert out == bench.shuffled_paragraphs(text) and out != bench.shuffled_paragraphs(text, seed=1)
    assert out.startswith(" \n") and "\n \n" in out


def test_teacher_samples_continue_their_prompts_and_resume_to_the_same_file(teachers, tiny_data, tmp_path):
    # data_tools/sample_lm_text.py: new distillation text sampled from the teacher
    from conftest import load_script
    from lflm_dist.data import Tokenizer
    tool = load_script("data_tools/sample_lm_text.py")
    tok_path = tiny_data / "tokenizer.json"
    tok = Tokenizer.load(tok_path)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(" = Heading = \n \n" + "".join(f" {w} came to the hall at dawn , and spoke of {w} . \n \n"
                                                       for w in ("Romeo", "Juliet", "Tybalt", "Mercutio", "Friar")))
    kw = dict(prompt_tokens=6, new_tokens=8, batch=2, tokenizer=tok_path)
    whole = tool.sample(teachers["llama"], prompts, tmp_path / "whole.txt", 6, **kw).read_text()
    lines = [line.strip() for line in whole.split("\n") if line.strip()]
    starts = [tok.decode(p).strip() for p in tool.prompt_ids(prompts.read_text(), tok, 6)]
    assert len(starts) == 5 and not any(s.startswith("=") for s in starts)  # the heading is no prompt
    assert len(lines) == 6 and all(line.startswith(starts[i % 5]) for i, line in enumerate(lines))
    assert all(len(line) > len(starts[i % 5]) for i, line in enumerate(lines))  # something was sampled
    # interrupted after 2 samples, killed in the middle of a batch, rerun: the same file
    part = tmp_path / "part.txt"
    tool.sample(teachers["llama"], prompts, part, 2, **kw)
    with open(part, "a") as f:
        f.write(" a half-written sam")
    assert tool.sample(teachers["llama"], prompts, part, 6, **kw).read_text() == whole
    # another seed samples other text; resuming a file with other settings is refused, naming them
    other = tool.sample(teachers["llama"], prompts, tmp_path / "seed1.txt", 6, seed=1, **kw).read_text()
    assert other != whole
    with pytest.raises(SystemExit, match="seed: 0 -> 1"):
        tool.sample(teachers["llama"], prompts, part, 6, seed=1, **kw)
