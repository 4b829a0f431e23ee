"""Scaling-law fits (numpy / scipy only; no plotting, no files).

* IsoFLOP minima (Chinchilla approach 2): per budget C, a parabola of loss in ln N through the
  runs of that budget; its vertex is (N_opt(C), L_opt(C)). Power laws N_opt = k C^a and
  L_opt = k C^b are then straight lines in log-log.
* Parametric fit (Chinchilla approach 3): L(N, D) = E + A / N^alpha + B / D^beta, fitted as
  Chinchilla and OLMo-core do: log L_hat = LSE(a - alpha ln N, b - beta ln D, e) with A = e^a,
  B = e^b, E = e^e, a Huber loss (delta 1e-3) on ln L - log L_hat, L-BFGS from a grid of
  starting points (the best of a Chinchilla-like grid) keeping the best; confidence intervals from refitting bootstrap resamples.
Every fit returns its caveats (`flags`) so the report can say where it is poorly constrained.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import minimize
from scipy.special import logsumexp

HUBER_DELTA = 1e-3
PARAMS = ("E", "A", "B", "alpha", "beta")


# ----------------------------------------------------------------------------- IsoFLOP minima
@dataclass
class IsoMin:
    budget: float
    n_opt: float | None
    l_opt: float | None
    d_opt: float | None
    coef: tuple | None  # parabola L = c2 x^2 + c1 x + c0, x = ln N
    flags: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.n_opt is not None


def isoflop_minimum(budget: float, n: list[float], d: list[float], loss: list[float]) -> IsoMin:
    """Vertex of the parabola in ln N through one budget's runs; D at the vertex interpolated
    linearly in (ln N, ln D) (on an IsoFLOP line D falls as N grows)."""
    x, y, ld = np.log(n), np.asarray(loss, float), np.log(d)
    flags = []
    if len(set(n)) < 3:
        return IsoMin(budget, None, None, None, None, [f"{len(set(n))} sizes: a parabola needs at least 3"])
    c2, c1, c0 = np.polyfit(x, y, 2)
    if len(set(n)) == 3:
        flags.append("3 sizes: the parabola passes through every point (no residual to judge it by)")
    if c2 <= 0:
        return IsoMin(budget, None, None, None, (c2, c1, c0),
                      flags + ["loss is not convex in ln N here: no minimum (sizes too close or too noisy)"])
    xv = -c1 / (2 * c2)
    lo, hi = x.min(), x.max()
    if int(np.argmin(y)) in (int(np.argmin(x)), int(np.argmax(x))):
        flags.append("lowest loss at the edge of the size grid")
    if not lo <= xv <= hi:
        where = f"vertex at N={math.exp(xv):.3g}, outside the size grid [{math.exp(lo):.3g}, {math.exp(hi):.3g}]"
        if min(abs(xv - lo), abs(xv - hi)) > 0.5 * (hi - lo):  # far out: the curvature is mostly noise
            return IsoMin(budget, None, None, None, (c2, c1, c0), flags + [where + ", too far to trust: no minimum"])
        flags.append(where + ": extrapolated")
    slope, icpt = np.polyfit(x, ld, 1)
    return IsoMin(budget, float(math.exp(xv)), float(c0 - c1 * c1 / (4 * c2)), float(math.exp(icpt + slope * xv)),
                  (c2, c1, c0), flags)


@dataclass
class PowerLaw:
    """y = k * C^exponent fitted in log-log; stderr of the exponent when there are > 2 points."""
    k: float | None
    exponent: float | None
    exponent_stderr: float | None
    n: int
    flags: list[str] = field(default_factory=list)

    def __call__(self, c):
        return self.k * np.asarray(c, float) ** self.exponent


def power_law(c: list[float], y: list[float]) -> PowerLaw:
    c, y = np.asarray(c, float), np.asarray(y, float)
    if len(c) < 2:
        return PowerLaw(None, None, None, len(c), [f"{len(c)} budget(s) with a minimum: no power law"])
    X = np.log(c)
    slope, icpt = np.polyfit(X, np.log(y), 1)
    flags, se = [], None
    if len(c) == 2:
        flags.append("2 budgets: the line passes through both (no error estimate)")
    else:
        resid = np.log(y) - (icpt + slope * X)
        se = float(math.sqrt(resid @ resid / (len(c) - 2) / ((X - X.mean()) ** 2).sum()))
        if se > 0.25 * abs(slope):
            flags.append(f"exponent stderr {se:.3f} is more than a quarter of the exponent")
    return PowerLaw(float(math.exp(icpt)), float(slope), se, len(c), flags)


# ----------------------------------------------------------------------------- parametric L(N, D)
def _objective(theta: np.ndarray, ln_n: np.ndarray, ln_d: np.ndarray, ln_l: np.ndarray, delta: float):
    """Huber loss of ln L against LSE(a - alpha ln N, b - beta ln D, e) and its gradient."""
    a, b, e, alpha, beta = theta
    u = np.stack([a - alpha * ln_n, b - beta * ln_d, np.full_like(ln_n, e)], 1)
    m = u.max(1, keepdims=True)
    ex = np.exp(u - m)
    s = ex.sum(1)
    r = ln_l - (m[:, 0] + np.log(s))
    small = np.abs(r) <= delta
    loss = np.where(small, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum()
    w = ex * (-np.where(small, r, delta * np.sign(r)) / s)[:, None]  # d loss / d u
    grad = np.array([w[:, 0].sum(), w[:, 1].sum(), w[:, 2].sum(), -(w[:, 0] * ln_n).sum(), -(w[:, 1] * ln_d).sum()])
    return loss, grad


BOUNDS = [(-30, 80), (-30, 80), (-10, 10), (0.0, 4.0), (0.0, 4.0)]  # a, b, e, alpha, beta


def init_grid(ln_l: np.ndarray) -> np.ndarray:
    """Starting points like Chinchilla's grid over (a, b, e, alpha, beta); e around and below the
    smallest observed ln L (E lies below every loss). [G, 5]"""
    e0 = float(np.min(ln_l))
    axes = ((0.0, 5.0, 10.0, 15.0, 20.0, 25.0), (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
            (e0 - 2.0, e0 - 1.0, e0 - 0.3, e0 - 0.05), (0.1, 0.3, 0.5, 1.0, 1.5), (0.1, 0.3, 0.5, 1.0, 1.5))
    return np.array(list(itertools.product(*axes)), float)


def _grid_losses(grid: np.ndarray, ln_n, ln_d, ln_l, delta) -> np.ndarray:
    """The objective at every grid point at once (vectorised: choosing where to start is cheap)."""
    a, b, e, alpha, beta = (grid[:, i:i + 1] for i in range(5))
    u = np.stack([a - alpha * ln_n, b - beta * ln_d, np.broadcast_to(e, (len(grid), len(ln_n)))], -1)
    r = ln_l - logsumexp(u, axis=-1)
    return np.where(np.abs(r) <= delta, 0.5 * r * r, delta * (np.abs(r) - 0.5 * delta)).sum(1)


def _fit_from(inits, ln_n, ln_d, ln_l, delta) -> tuple[np.ndarray, float, list]:
    results = []
    for x0 in inits:
        # tolerances far below scipy's defaults: the Huber loss of a good fit is ~1e-4, so its
        # gradient starts below the default gtol and L-BFGS would stop where it began
        r = minimize(_objective, x0, args=(ln_n, ln_d, ln_l, delta), jac=True, method="L-BFGS-B", bounds=BOUNDS,
                     options={"gtol": 1e-12, "ftol": 1e-14, "maxiter": 2000})
        results.append((float(r.fun), r.x))
    results.sort(key=lambda t: t[0])
    return results[0][1], results[0][0], results


def to_params(theta: np.ndarray) -> dict:
    a, b, e, alpha, beta = theta
    return {"E": math.exp(e), "A": math.exp(a), "B": math.exp(b), "alpha": float(alpha), "beta": float(beta)}


def predict(p: dict, n, d):
    return p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"] + p["B"] / np.asarray(d, float) ** p["beta"]


def fit_parametric(n: list[float], d: list[float], loss: list[float], *, bootstrap: int = 200, seed: int = 0,
                   delta: float = HUBER_DELTA) -> dict:
    """Point estimate (best of the init grid), bootstrap percentiles (2.5, 97.5) per parameter and
    for a = beta / (alpha + beta) (the N_opt exponent it implies), and flags."""
    ln_n, ln_d, ln_l = np.log(n), np.log(d), np.log(loss)
    grid = init_grid(ln_l)
    # L-BFGS from the best grid points (the full grid, minimised one by one, costs minutes)
    best_grid = grid[np.argsort(_grid_losses(grid, ln_n, ln_d, ln_l, delta))[:16]]
    theta, best, results = _fit_from(best_grid, ln_n, ln_d, ln_l, delta)
    p = to_params(theta)
    p["a_nopt"] = p["beta"] / (p["alpha"] + p["beta"]) if p["alpha"] + p["beta"] > 0 else float("nan")
    # bootstraps restart from the point estimate and a few other local optima of the full fit
    # (cheap, and still lets a resample land in another basin)
    starts = [theta, results[len(results) // 2][1]]
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(ln_n), len(ln_n))
        th, _, _ = _fit_from(starts, ln_n[idx], ln_d[idx], ln_l[idx], delta)
        q = to_params(th)
        q["a_nopt"] = q["beta"] / (q["alpha"] + q["beta"]) if q["alpha"] + q["beta"] > 0 else float("nan")
        samples.append(q)
    ci = {k: (float(np.nanpercentile([s[k] for s in samples], 2.5)), float(np.nanpercentile([s[k] for s in samples], 97.5)))
          for k in p} if samples else {}
    flags = []
    if len(ln_n) < 15:
        flags.append(f"{len(ln_n)} runs for 5 parameters: poorly constrained")
    if len(set(np.round(ln_d, 6))) < 3 or len(set(np.round(ln_n, 6))) < 3:
        flags.append("fewer than 3 distinct N or D values")
    for k, (lo_b, hi_b), v in zip(("E", "alpha", "beta"), BOUNDS[2:], (theta[2], theta[3], theta[4])):
        if min(abs(v - lo_b), abs(v - hi_b)) < 1e-3:
            flags.append(f"{k} = {p[k]:.3g} sits on the bound of its search range: that term is not identified")
    for k in ("alpha", "beta", "E"):
        if ci and ci[k][1] - ci[k][0] > abs(p[k]):
            flags.append(f"{k}: bootstrap interval [{ci[k][0]:.3g}, {ci[k][1]:.3g}] is wider than the estimate")
    resid = ln_l - np.log(predict(p, n, d))
    return {"params": p, "ci": ci, "bootstrap": bootstrap, "huber_loss": best, "n": len(ln_n),
            "rms_log_residual": float(np.sqrt(np.mean(resid ** 2))), "flags": flags, "samples": samples}


def compute_optimal_frontier(p: dict, k_flops: float, budgets, n_min: float = 1e3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """L*(C) = min_N L(N, C / (k N)) for each C (k = C / (N D), the family's FLOPs per parameter per
    token): minimised on a fine ln N grid from n_min up. Returns (L*, N*, D*)."""
    ln_n = np.linspace(math.log(n_min), math.log(max(1e15, 1e6 * n_min)), 3000)
    out_l, out_n, out_d = [], [], []
    for c in np.asarray(budgets, float):
        nn = np.exp(ln_n)
        dd = c / (k_flops * nn)
        loss = predict(p, nn, dd)
        i = int(np.argmin(loss))
        out_l.append(loss[i]), out_n.append(nn[i]), out_d.append(dd[i])
    return np.array(out_l), np.array(out_n), np.array(out_d)


def crossing(c_grid: np.ndarray, l_a: np.ndarray, l_b: np.ndarray) -> float | None:
    """First compute in c_grid (log-interpolated) where l_a - l_b changes sign, else None."""
    diff = np.asarray(l_a) - np.asarray(l_b)
    for i in range(len(diff) - 1):
        if diff[i] == 0:
            return float(c_grid[i])
        if diff[i] * diff[i + 1] < 0:
            t = diff[i] / (diff[i] - diff[i + 1])
            return float(math.exp(math.log(c_grid[i]) + t * (math.log(c_grid[i + 1]) - math.log(c_grid[i]))))
    return None


def power_law_crossing(a: PowerLaw, b: PowerLaw) -> float | None:
    """C where a.k C^a.exp = b.k C^b.exp (None if parallel or missing)."""
    if a.k is None or b.k is None or a.exponent == b.exponent:
        return None
    return float(math.exp((math.log(b.k) - math.log(a.k)) / (a.exponent - b.exponent)))
