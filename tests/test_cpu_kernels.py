"""The fused CPU kernels (lflm_dist/models/cpu_kernels.cpp) against the PyTorch formulas they
replace: RMSNorm, adaLN's modulated RMSNorm, and QK-norm + RoPE read from a fused qkv projection;
plus the build's fallback."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from lflm_dist.config import TransformerConfig
from lflm_dist.models import blocks, cpu_kernels

HAVE_CXX = any(shutil.which(c) for c in (os.environ.get("CXX", "c++"), "c++", "g++"))
needs_kernels = pytest.mark.skipif(not HAVE_CXX, reason="no C++ compiler: the kernels cannot build here")


@pytest.fixture(scope="module")
def kern():
    if not HAVE_CXX or os.environ.get("LFLM_CPU_KERNELS") == "0":
        pytest.skip("no C++ compiler, or LFLM_CPU_KERNELS=0")
    module = cpu_kernels.get()
    assert module is not None, "a C++ compiler is present, yet the fused CPU kernels did not build (see the warning)"
    return module


def _grads(y, inputs, gy):
    return torch.autograd.grad(y, inputs, gy)


@needs_kernels
@pytest.mark.parametrize("shape", [(7, 128), (3, 17, 96), (2, 5, 3, 32)])
def test_rms_norm_matches_reference(kern, shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).requires_grad_()
    gy = torch.randn(*shape, generator=g)
    y = kern.rms_norm(x, w, 1e-6)
    ref = blocks.rms_norm_reference(x.double(), w.double(), 1e-6)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(y, (x, w), gy), _grads(ref, (x, w), gy.double())):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("q_from", [0, 3])
def test_rms_norm_rope_reads_the_projection_and_writes_heads_first(kern, q_from):
    """q is a strided view of a [B, T, 3, H, hd] projection (as Attention makes it), optionally
    only positions q_from..; the kernel gives RMSNorm then RoPE in the [B, H, T, hd] layout, and
    the grads of the projection and the gain the formulas give."""
    B, T, H, hd = 2, 9, 3, 16
    g = torch.Generator().manual_seed(1)
    qkv = torch.randn(B, T, 3 * H * hd, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(hd, generator=g)).requires_grad_()
    rope = blocks.rope_freqs(torch.arange(T), hd, 10000.0)[q_from:]
    q = qkv.view(B, T, 3, H, hd).unbind(2)[1][:, q_from:]
    y = kern.rms_norm_rope(q, w, torch.view_as_real(rope).flatten(1), 1e-6)
    assert y.shape == (B, H, T - q_from, hd) and y.is_contiguous()
    ref = blocks.apply_rope(blocks.rms_norm_reference(q, w, 1e-6), rope).transpose(1, 2)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    gy = torch.randn(B, T - q_from, H, hd, generator=g).transpose(1, 2)  # a strided grad, as SDPA's can be
    for a, b in zip(_grads(y, (qkv, w), gy), _grads(ref, (qkv, w), gy)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernels
def test_qkv_norm_rope_gives_attention_inputs_and_the_projection_grad(kern):
    """From a [B, T, 3, H, hd] projection: q and k normalised and rotated, v as is, all
    [B, H, T, hd]; grads of the projection and both gains as the formulas give them (an output
    left unused, here v in the second call, counts as a zero grad)."""
    B, T, H, hd = 2, 8, 3, 16
    g = torch.Generator().manual_seed(3)
    proj = torch.randn(B, T, 3 * H * hd, generator=g).requires_grad_()
    wq, wk = ((1 + 0.1 * torch.randn(hd, generator=g)).requires_grad_() for _ in range(2))
    rope = blocks.rope_freqs(torch.arange(T), hd, 10000.0)
    qkv = proj.view(B, T, 3, H, hd)
    gys = [torch.randn(B, T, H, hd, generator=g).transpose(1, 2) for _ in range(3)]
    for used in (3, 2):
        out = kern.qkv_norm_rope(qkv, wq, wk, torch.view_as_real(rope).flatten(1), 1e-6)
        q, k, v = qkv.unbind(2)
        ref = [blocks.apply_rope(blocks.rms_norm_reference(q, wq, 1e-6), rope).transpose(1, 2),
               blocks.apply_rope(blocks.rms_norm_reference(k, wk, 1e-6), rope).transpose(1, 2), v.transpose(1, 2)]
        for a, b in zip(out, ref):
            assert a.shape == (B, H, T, hd) and a.is_contiguous()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        loss_a = sum((a * gy).sum() for a, gy in zip(out[:used], gys))
        loss_b = sum((b * gy).sum() for b, gy in zip(ref[:used], gys))
        for a, b in zip(torch.autograd.grad(loss_a, (proj, wq, wk)), torch.autograd.grad(loss_b, (proj, wq, wk))):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("qk_norm", [True, False])
def test_block_with_kernels_equals_block_without(kern, qk_norm):
    """A whole block (norms, QK-norm, RoPE, causal and block-causal attention, q_from) gives the
    PyTorch path's outputs and parameter grads."""
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=64, n_layers=1, n_heads=4, qk_norm=qk_norm)
    block = blocks.Block(cfg)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 16, 64)
    rope = blocks.rope_freqs(torch.arange(16), 16, 10000.0)
    for mask, q_from in ((blocks.CAUSAL, 0), (blocks.block_causal_mask(16, 4), 0),
                         (blocks.block_causal_mask(16, 4)[8:], 8)):
        outs = []
        for ctx in (cpu_kernels.disabled, _enabled):
            block.zero_grad()
            with ctx():
                y = block(x, rope, mask, q_from=q_from)
                y.square().sum().backward()
            outs.append((y.detach(), [p.grad.clone() for p in block.parameters()]))
        (y0, g0), (y1, g1) = outs
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_kernels
@pytest.mark.parametrize("groups", [1, 4, 12])
def test_rms_norm_modulate_matches_norm_then_modulate(kern, groups):
    """adaLN's modulated RMSNorm against rms_norm_reference then blocks.modulate, with shift and
    scale strided views of one [B, G, 6D] projection (as Block makes them), G = 1 (per sequence), per
    block and per position: outputs and the grads of x, the gain, shift and scale."""
    B, T, D = 3, 12, 64
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, T, D, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(D, generator=g)).requires_grad_()
    mod = torch.randn(B, groups, 6 * D, generator=g).requires_grad_()
    shift, scale = mod.chunk(6, dim=-1)[:2]
    gy = torch.randn(B, T, D, generator=g)
    y = kern.rms_norm_modulate(x, w, shift, scale, 1e-6)
    ref = blocks.modulate(blocks.rms_norm_reference(x.double(), w.double(), 1e-6), shift.double(), scale.double())
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(_grads(y, (x, w, mod), gy), _grads(ref, (x, w, mod), gy.double())):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-4)


@needs_kernels
def test_adaln_block_with_kernels_equals_block_without(kern):
    """A DiT block (adaLN: modulated norms, gates) with conditioning per block, per position
    through a table (cond_index) and queries from q_from gives the PyTorch path's outputs and
    parameter and input grads."""
    torch.manual_seed(0)
    cfg = TransformerConfig(dim=64, n_layers=1, n_heads=4)
    block = blocks.Block(cfg, adaln=True)
    with torch.no_grad():
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 16, 64, requires_grad=True)
    rope = blocks.rope_freqs(torch.arange(16), 16, 10000.0)
    per_block = torch.randn(2, 4, 64, requires_grad=True)
    table, index = torch.randn(5, 64, requires_grad=True), torch.randint(0, 5, (2, 16))
    mask = blocks.block_causal_mask(16, 4)
    for cond, cond_index, m, q_from in ((per_block, None, mask, 0), (per_block, None, mask[8:], 8),
                                        (table, index, mask, 0)):
        outs = []
        for ctx in (cpu_kernels.disabled, _enabled):
            block.zero_grad()
            inputs = [x, cond]
            with ctx():
                y = block(x, rope, m, cond=cond, q_from=q_from, cond_index=cond_index)
                grads = torch.autograd.grad(y.square().sum(), [*block.parameters(), *inputs])
            outs.append((y.detach(), grads))
        (y0, g0), (y1, g1) = outs
        torch.testing.assert_close(y1, y0, rtol=1e-5, atol=1e-5)
        for a, b in zip(g1, g0):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


class _enabled:
    def __enter__(self):
        assert cpu_kernels.get() is not None

    def __exit__(self, *exc):
        return False


@needs_kernels
def test_gain_grads_do_not_depend_on_the_thread_count(kern):
    """gw sums fixed chunks of rows in a fixed order, so runs with 1 and 2 threads (a 2-process
    run and a 1-process run of the same rows) agree to the bit."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(48, 64, 128, generator=g).requires_grad_()
    w = torch.randn(128, generator=g).requires_grad_()
    gy = torch.randn(48, 64, 128, generator=g)
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out.append(_grads(kern.rms_norm(x, w, 1e-6), (x, w), gy))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    shift, scale = torch.randn(2, 48, 16, 128, generator=g).unbind(0)
    mod = []
    try:
        for n in (1, 2):  # the modulated norm's gain grads too, over chunks of whole groups
            torch.set_num_threads(n)
            mod.append(_grads(kern.rms_norm_modulate(x, w, shift, scale, 1e-6), (x, w), gy))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(mod[0][0], mod[1][0]) and torch.equal(mod[0][1], mod[1][1])


def test_a_failed_build_warns_and_falls_back(tmp_path):
    """With a compiler that fails (CXX=false) the module is None, one warning names the source
    and the switch, and a block still trains through the PyTorch ops."""
    code = (
        "import warnings, torch\n"
        "from lflm_dist.models import cpu_kernels, blocks\n"
        "from lflm_dist.config import TransformerConfig\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    b = blocks.Block(TransformerConfig(dim=32, n_layers=1, n_heads=2))\n"
        "    y = b(torch.randn(1, 4, 32), blocks.rope_freqs(torch.arange(4), 16, 1e4), blocks.CAUSAL)\n"
        "    y.sum().backward()\n"
        "assert cpu_kernels.get() is None\n"
        "msgs = [str(m.message) for m in w if 'fused CPU kernels' in str(m.message)]\n"
        "assert len(msgs) == 1 and 'cpu_kernels.cpp' in msgs[0] and 'LFLM_CPU_KERNELS=0' in msgs[0], msgs\n"
        "print('ok')\n")
    env = {**os.environ, "CXX": "false", "LFLM_KERNEL_CACHE": str(tmp_path), "LFLM_CPU_KERNELS": "1"}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
    assert not any(tmp_path.glob("*.so")), "nothing is cached from a failed build"
