"""CUDA paths, run where a GPU exists (skipped elsewhere): FlexAttention's compiled kernel
against the dense-mask reference, outputs and gradients (its backward exists only on CUDA),
and the trainer on NCCL with one process under every strategy (plain, FSDP2, DeepSpeed ZeRO
1/2/3) giving the losses of the plain run, in fp32 and in bf16.

Tolerances: fp32 attention within 1e-4 (different summation order, TF32 off); strategy
losses within rel 1e-3 of the plain run in fp32 (CUDA reductions are not bit-reproducible
across kernels) and within 3e-2 in bf16, where the strategies round differently (autocast vs
FSDP2's bf16 parameters vs DeepSpeed's bf16 weights)."""
import copy

import pytest
import torch

from lflm_dist.config import load_config
from lflm_dist.models.blocks import AttnMask, flex_attention, prepare_mask, set_attention_backend
from lflm_dist.models.registry import build_model
from test_train import launch, losses

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


MASKS = {
    "block_causal": lambda B: AttnMask("block_causal", 200, 4),
    "causal_cached": lambda B: AttnMask("block_causal", 200, 1, q_start=72),
    "clean_noisy_drop": lambda B: AttnMask("clean_noisy", 160, 16, drop_history=torch.tensor([True, False, False],
                                                                                            device="cuda")),
    "clean_noisy_rows": lambda B: AttnMask("clean_noisy", 160, 16, q_start=160),
}


@pytest.mark.parametrize("name", list(MASKS))
def test_flex_attention_equals_dense_outputs_and_grads(name):
    mask = MASKS[name](3)
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(3, 4, mask.q_len, 32, device="cuda", generator=g, requires_grad=True)
    k, v = (torch.randn(3, 4, mask.kv_len, 32, device="cuda", generator=g, requires_grad=True) for _ in range(2))
    dense = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense("cuda"))
    gd = torch.autograd.grad(dense.square().sum(), (q, k, v))
    flex = flex_attention(q, k, v, mask.block_mask("cuda"))
    gf = torch.autograd.grad(flex.square().sum(), (q, k, v))
    torch.testing.assert_close(flex, dense, rtol=1e-4, atol=1e-4)
    for a, b in zip(gf, gd):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_auto_backend_uses_flex_for_training_and_is_causal_on_cuda():
    cuda = torch.device("cuda")
    assert prepare_mask(AttnMask("block_causal", 64, 1), "auto", cuda) == "causal"
    assert type(prepare_mask(AttnMask("block_causal", 64, 4), "auto", cuda)).__name__ == "BlockMask"
    # cached decoding and no-grad evaluation keep the dense mask (no recompilation per length)
    assert torch.is_tensor(prepare_mask(AttnMask("block_causal", 64, 4, q_start=60), "auto", cuda))
    with torch.no_grad():
        assert torch.is_tensor(prepare_mask(AttnMask("block_causal", 64, 4), "auto", cuda))


def test_cola_loss_and_grads_flex_equal_dense_on_cuda():
    cfg = load_config(None, ["model.vocab_size=100", "model.cola.stage=2", "model.cola.lambda_ref=0", "model.cola.latent_stats=identity",
                             "model.dit.block_size=8", "model.dit.cfg_drop_prob=0.5", "model.vae.mask_prob=0.1"])
    torch.manual_seed(0)
    base = build_model(cfg.model, init_pretrained=False).cuda()
    for p in base.dit.parameters():  # leave adaLN-Zero's zero init so the DiT's attention matters
        torch.nn.init.normal_(p, std=0.05)
    batch = {"input_ids": torch.randint(0, 100, (4, 64), device="cuda"),
             "noise_key": torch.arange(4, device="cuda", dtype=torch.int64) * 11 + 3}
    out = {}
    for backend in ("dense", "flex"):
        m = copy.deepcopy(base)
        set_attention_backend(m, backend)
        terms = m.loss(batch)
        terms["loss"].backward()
        out[backend] = terms["loss"].detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}
    torch.testing.assert_close(out["flex"][0], out["dense"][0], rtol=1e-5, atol=1e-5)
    for n, g in out["dense"][1].items():
        torch.testing.assert_close(out["flex"][1][n], g, rtol=1e-3, atol=1e-5, msg=n)


STRATEGIES = {
    "fsdp2": ["parallel.strategy=fsdp2"],
    "zero1": ["parallel.strategy=deepspeed", "parallel.zero_stage=1"],
    "zero2": ["parallel.strategy=deepspeed", "parallel.zero_stage=2"],
    "zero3": ["parallel.strategy=deepspeed", "parallel.zero_stage=3"],
}


TOLERANCE = {"fp32": 1e-3, "bf16": 3e-2}
COMMON = ["train.max_steps=4", "train.ckpt_every=4", "parallel.backend=nccl"]


@pytest.fixture(scope="module")
def plain_losses(tiny_data, tmp_path_factory):
    """The plain (one process, no wrapper) run's losses per precision, trained once per module."""
    cache = {}

    def get(precision):
        if precision not in cache:
            run = tmp_path_factory.mktemp(f"plain_{precision}")
            p = launch(tiny_data, run, *COMMON, f"train.precision={precision}")
            assert "device=cuda:0" in p.stdout
            cache[precision] = losses(run)
        return cache[precision]
    return get


# one test per strategy and precision (each a fresh training process), so a GPU session cut short
# by its device time still reports the ones that ran
@pytest.mark.parametrize("precision", list(TOLERANCE))
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategies_on_nccl_match_plain_run(strategy, precision, plain_losses, tiny_data, tmp_path):
    if strategy != "fsdp2":
        pytest.importorskip("deepspeed")
    ref = plain_losses(precision)
    p = launch(tiny_data, tmp_path / strategy, *COMMON, f"train.precision={precision}", *STRATEGIES[strategy])
    assert "device=cuda:0" in p.stdout, strategy
    got = losses(tmp_path / strategy)
    assert len(got) == len(ref) == 4
    rel = TOLERANCE[precision]
    for a, b in zip(got, ref):
        assert abs(a - b) <= rel * abs(b), (strategy, precision, got, ref)
