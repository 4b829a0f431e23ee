"""log-density of a continuous normalising flow (Chen et al. 2018; FFJORD's trace estimator),
used by latent families whose prior is an ODE (Cola DLM's flow-matching DiT)."""
from __future__ import annotations

import math

import torch

LOG_2PI = math.log(2 * math.pi)
FIXED_STEP_METHODS = ("euler", "midpoint", "rk4", "explicit_adams", "implicit_adams")


def _divergence(v: torch.Tensor, x: torch.Tensor, probes: torch.Tensor | None) -> torch.Tensor:
    """Per-sample divergence of v(x) [B, ...]: exact (probes None) or Hutchinson mean over probes [P, B, ...]."""
    B = x.shape[0]
    if probes is None:
        flat = v.reshape(B, -1)
        div = torch.zeros(B, dtype=torch.float32, device=x.device)
        for i in range(flat.shape[1]):
            g = torch.autograd.grad(flat[:, i].sum(), x, retain_graph=True)[0]
            div = div + g.reshape(B, -1)[:, i].float()
        return div
    div = torch.zeros(B, dtype=torch.float32, device=x.device)
    for p in range(probes.shape[0]):
        g = torch.autograd.grad(v, x, probes[p], retain_graph=p < probes.shape[0] - 1)[0]
        div = div + (g * probes[p]).reshape(B, -1).sum(-1).float()
    return div / probes.shape[0]


def draw_probes(shape: tuple, probe_dist: str, generator: torch.Generator | None) -> torch.Tensor:
    """Hutchinson probe vectors (fp32, CPU): Rademacher ±1 or standard Gaussian."""
    if probe_dist == "rademacher":
        return torch.randint(0, 2, shape, generator=generator, device="cpu").float() * 2 - 1
    if probe_dist == "gaussian":
        return torch.randn(shape, generator=generator, device="cpu")
    raise ValueError(f"probe_dist must be rademacher or gaussian, got {probe_dist!r}")


def cnf_log_density(velocity, x0: torch.Tensor, *, trace: str = "hutchinson", probes: int = 1,
                    probe_dist: str = "rademacher", method: str = "dopri5", steps: int = 8, rtol: float = 1e-4,
                    atol: float = 1e-4, generator: torch.Generator | None = None,
                    probe_vectors: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """log p_0(x0) [B] for the flow dx/dt = velocity(x, t), t from 0 to 1, with p_1 = N(0, I).

    velocity(x [B, ...], t scalar tensor) -> [B, ...]. `trace`: "hutchinson" (`probes` probe
    vectors drawn once per call and held fixed along the trajectory, Rademacher or Gaussian) or
    "exact"; `probe_vectors` [probes, B, ...] gives the probes instead of drawing them (common random
    numbers across calls). `method`: a torchdiffeq solver; fixed-step ones use `steps` steps, adaptive ones
    (dopri5, ...) `rtol`/`atol`. Returns (log density, {"nfe": function evaluations})."""
    from torchdiffeq import odeint

    if trace not in ("hutchinson", "exact"):
        raise ValueError(f"trace must be hutchinson or exact, got {trace!r}")
    B = x0.shape[0]
    D = x0[0].numel()
    eps = None
    if trace == "hutchinson" and probe_vectors is not None:
        eps = probe_vectors.to(x0.device, x0.dtype)
    elif trace == "hutchinson":
        eps = draw_probes((probes, *x0.shape), probe_dist, generator).to(x0.device, x0.dtype)
    nfe = [0]

    def f(t, state):
        nfe[0] += 1
        with torch.enable_grad():
            x = state[0].detach().requires_grad_(True)
            v = velocity(x, t)
            div = _divergence(v, x, eps)
        return v.detach(), div.detach().to(state[1].dtype)

    options = {"step_size": 1.0 / steps} if method in FIXED_STEP_METHODS else None
    ts = torch.tensor([0.0, 1.0], device=x0.device)
    state0 = (x0.detach(), torch.zeros(B, device=x0.device, dtype=torch.float64 if x0.dtype == torch.float64
                                       else torch.float32))
    xs, divs = odeint(f, state0, ts, method=method, rtol=rtol, atol=atol, options=options)
    x1, int_div = xs[-1], divs[-1]
    log_p1 = -0.5 * x1.reshape(B, -1).pow(2).sum(-1) - 0.5 * D * LOG_2PI
    return log_p1 + int_div, {"nfe": nfe[0]}


