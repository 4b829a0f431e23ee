"""lm-evaluation-harness adapter: `lm_eval --model lflm --model_args run=DIR ...` once this
module is imported (it registers the class under the name "lflm"). It sees a model only through
the family interface (lflm_dist.models.family).

* `loglikelihood(context, continuation)`: −[B(context + continuation) − B(context)], B the
  family's `nll_bound` of a window laid out as its `eval_layout` says (BOS first if it takes
  one; the context left-padded with <|endoftext|> to whole blocks, as samplers pad prompts, so
  both windows share the same prefix layout). For a family whose NLL factorises over tokens
  exactly (the AR baseline: `Bound.token_nll`) this is exact and read from one forward pass of
  the full window, with lm-eval's is_greedy. For latent families the difference of two bounds is
  an estimate, not a bound; both use the same random numbers where the family provides them
  (`bound_noise` / `prefix_noise`: Cola's posterior noise and Hutchinson probes drawn once for the
  full window, the context taking their prefix), so the context's own noise cancels rather than
  adding to the variance; with draws > 1 the estimate is the mean over draws and its Monte Carlo
  standard error is kept per request (`mc_stderr`, summarised by `run_harness`). Inputs longer
  than the model's window keep their last tokens (context truncated on the left).
* `loglikelihood_rolling(text)`: −(the family's NLL figure of `text` cut into its eval windows).
* `generate_until(context, gen_kwargs)`: the family's sampler (Cola: `steps` Euler steps per
  block, `guidance`), cut at the first `until` string; greedy token choice unless
  gen_kwargs sets do_sample / temperature.
"""
from __future__ import annotations

import os

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from lflm_dist.eval.likelihood import BoundSettings, make_windows, window_bounds, window_tensor


def _bool(x) -> bool:
    return x if isinstance(x, bool) else str(x).lower() in ("1", "true", "yes")


@register_model("lflm")
class LFLM(LM):
    def __init__(self, run: str | None = None, model=None, cfg=None, tokenizer=None, device: str | None = None,
                 batch_size: int | str | None = 8, max_batch_size=None, iwae_k: int = 1, draws: int = 1,
                 trace: str = "hutchinson", probes: int = 1, ode_method: str = "rk4", ode_steps: int = 8,
                 rtol: float = 1e-4, atol: float = 1e-4, steps: int = 8, guidance: float = 1.0, seed: int = 0,
                 **_unused):
        super().__init__()
        if model is None:
            if run is None:
                raise ValueError("lflm needs model_args run=DIR (a run dir written by launchers/pretrain.py)")
            from lflm_dist.generate import load_run
            # lm-eval's CLI passes device="cuda" by default: fall back to the CPU where there is none
            if not device or (str(device).startswith("cuda") and not torch.cuda.is_available()):
                device = "cuda" if torch.cuda.is_available() else "cpu"
            model, cfg, tokenizer = load_run(run, device)
        self.model, self.cfg, self.tok = model.eval(), cfg, tokenizer
        self.family, self.layout = model.family, model.eval_layout()
        self.seq_len = cfg.model.seq_len
        self.block = self.layout.block
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.settings = BoundSettings(iwae_k=int(iwae_k), draws=int(draws), trace=trace, probes=int(probes),
                                      method=ode_method, steps=int(ode_steps), rtol=float(rtol), atol=float(atol),
                                      seed=int(seed))
        self.steps, self.guidance, self.seed = int(steps), float(guidance), int(seed)
        self._device = next(model.parameters()).device
        self.draws = 1 if model.likelihood_kind(self.settings) == "exact" else self.settings.draws
        self.mc_stderr: list[float] = []  # per loglikelihood request of a latent family, when draws > 1

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def max_length(self) -> int:
        return self.seq_len

    # ------------------------------------------------------------------ scoring
    def _bounds(self, windows: list[tuple[list[int], int]]) -> list[float]:
        if not windows:
            return []
        return window_bounds(self.model, windows, pad_id=self.tok.eos_id, settings=self.settings,
                             batch_size=self.batch_size, terms=False)["nats"]

    def _pair(self, ctx: list[int], cont: list[int]) -> tuple[list[int], list[int]]:
        """(full window, context window) in the family's layout: at most `window` text tokens,
        the context left-padded to whole blocks and the full window right-padded to them."""
        bs, eos, w = self.block, self.tok.eos_id, self.layout.window
        cont = cont[-(w - bs):] if len(cont) > w - bs else cont
        room = w - (-(-len(cont) // bs) * bs)  # tokens left for the padded context
        ctx = ctx[-room:] if room > 0 else []
        ctx_p = [eos] * ((-len(ctx)) % bs) + ctx
        full = ctx_p + cont
        return full + [eos] * ((-len(full)) % bs), ctx_p

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        # trailing spaces of the context belong to the continuation (lm-eval convention)
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            continuation, context = context[-n_spaces:] + continuation, context[:-n_spaces]
        return self.tok.encode(context), self.tok.encode(continuation)

    @torch.no_grad()
    def _loglik(self, index: int, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
        """−[B(full) − B(ctx)] averaged over draws, with common random numbers per draw; exact
        from one pass for families that give per-token NLLs."""
        s, eos = self.settings, self.tok.eos_id
        full, ctx_p = self._pair(ctx, cont)
        ft = window_tensor([full], self.layout, eos, self._device)
        ct = window_tensor([ctx_p], self.layout, eos, self._device) if ctx_p else None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        diffs = []
        for _ in range(self.draws):
            noise = self.model.bound_noise(ft.shape[1], s, g)
            b = self.model.nll_bound(ft, settings=s, generator=g, noise=noise)
            if b.token_nll is not None:  # exact per token: the continuation's own terms
                n = min(len(cont), len(full) - len(ctx_p))  # the continuation may have been cut to the window
                return -float(b.token_nll[0, -n:].sum()), bool(b.token_greedy[0, -n:].all())
            c = (float(self.model.nll_bound(ct, settings=s, generator=g,
                                            noise=self.model.prefix_noise(noise, ct.shape[1])).nll[0])
                 if ct is not None else 0.0)
            diffs.append(float(b.nll[0]) - c)
        if len(diffs) > 1:
            d = torch.tensor(diffs, dtype=torch.float64)
            self.mc_stderr.append(float(d.std() / len(diffs) ** 0.5))
        return -sum(diffs) / len(diffs), False

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        return [self._loglik(i, *self._encode_pair(*r.args[:2])) for i, r in enumerate(requests)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for r in requests:
            ids = self.tok.encode(r.args[0])
            windows = make_windows(ids, self.layout, self.tok.eos_id)
            out.append(-sum(self._bounds(windows)))
        return out

    # ------------------------------------------------------------------ generation
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out = []
        g = torch.Generator(device=self._device).manual_seed(self.seed)
        for r in requests:
            context, kw = r.args[0], dict(r.args[1]) if len(r.args) > 1 else {}
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", 32))
            temp = float(kw.get("temperature", 1.0 if _bool(kw.get("do_sample", False)) else 0.0))
            ids = self.tok.encode(context)[-max(self.block, self.seq_len - self.block):]
            toks = self.model.sample([ids], max_new, steps=self.steps, guidance=self.guidance, temperature=temp,
                                     top_k=int(kw.get("top_k", 0)), top_p=float(kw.get("top_p", 1.0)),
                                     pad_id=self.tok.eos_id, generator=g)[0]
            text = self.tok.decode(toks)
            for st in until + [self.tok.decode([self.tok.eos_id])]:
                j = text.find(st)
                if j >= 0:
                    text = text[:j]
            out.append(text)
        return out


def run_harness(run: str | None, tasks: list[str], *, include_path: str | None = None, limit=None,
                num_fewshot: int | None = None, device: str = "cpu", model_kwargs: dict | None = None,
                lm: LFLM | None = None, log_samples: bool = False, include_defaults: bool = True) -> dict:
    """lm_eval.simple_evaluate with the lflm model (offline: no hub access); returns its results dict.
    `include_defaults=False` indexes only the tasks under `include_path` (skips lm-eval's ~8 s scan)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import lm_eval
    from lm_eval.tasks import TaskManager
    if lm is None:
        lm = LFLM(run=run, device=device, **(model_kwargs or {}))
    tm = TaskManager(include_path=include_path, include_defaults=include_defaults) if include_path else TaskManager()
    res = lm_eval.simple_evaluate(model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=tm,
                                  log_samples=log_samples, bootstrap_iters=0)
    spread = ({"draws": lm.settings.draws, "mean": sum(lm.mc_stderr) / len(lm.mc_stderr), "max": max(lm.mc_stderr),
               "note": "Monte Carlo standard error (nats) of each Cola loglikelihood estimate over draws"}
              if lm.mc_stderr else None)
    return {"results": res["results"], "configs": {k: str(v) for k, v in res.get("configs", {}).items()},
            "versions": res.get("versions", {}), "model": {"run": run, "family": lm.family,
                                                           "settings": lm.settings.__dict__,
                                                           "loglikelihood_mc_stderr": spread}}
