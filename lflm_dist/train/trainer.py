"""The one training loop every model family uses.

Per optimizer step: the rank's share of the global batch (global_batch_size / world size)
is split into `grad_accum` micro-batches; each sample carries a noise key derived from
(seed, step, global position) so the loss is the same however the batch is split across
processes and micro-batches. Loss terms are averaged over micro-batches and ranks.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import shutil
import time
from pathlib import Path

import torch

from lflm_dist.config import Config, ConfigError, save_config
from lflm_dist.data.loader import TokenBatches, eval_batches
from lflm_dist.data.remote import RemoteDir, RemoteShards, is_remote
from lflm_dist.data.shards import check_tokenizer, read_manifest
from lflm_dist.data.tokenizer import Tokenizer
from lflm_dist.models.noise import sample_keys
from lflm_dist.models.registry import build_model, count_params, init_model
from lflm_dist.parallel import build_parallel, needs_process_group, unwrap
from lflm_dist.parallel.mfu import device_peak, peak_memory_mb
from lflm_dist.train import checkpoint as ckpt
from lflm_dist.train.dist import DistInfo, all_reduce_mean, barrier, init_distributed
from lflm_dist.train.host_memory import retain_freed_memory
from lflm_dist.train.logging import MetricsLogger
from lflm_dist.train.optim import lr_at
from lflm_dist.train.preemption import Preempted, PreemptionFlag
from lflm_dist.train.run_lock import RunDirInUse, RunLock

EVAL_SEED = 0x5EED


class NonFiniteLossError(RuntimeError):
    pass


def data_root(cfg: Config):
    """data.path as a local Path, or a RemoteDir (http(s):// or pipe:) with the run's retry settings."""
    d = cfg.data
    return RemoteDir(d.path, retries=d.retries, backoff_s=d.retry_backoff_s) if is_remote(d.path) else Path(d.path)


def split_location(cfg: Config, split: str):
    """A split: a name under data.path, or a webdataset brace pattern of shard URLs / pipe commands."""
    d = cfg.data
    if is_remote(split):
        return RemoteShards(split, retries=d.retries, backoff_s=d.retry_backoff_s)
    root = data_root(cfg)
    return root.child(split) if is_remote(root) else root / split


def resolve_vocab(cfg: Config) -> Tokenizer:
    """Load the run's tokenizer and fill model.vocab_size from it."""
    root = data_root(cfg)
    tok_path = root.cached("tokenizer.json") if is_remote(root) else root / "tokenizer.json"
    if not tok_path.is_file():
        raise FileNotFoundError(f"{tok_path} not found: data.path must point at a prepared data dir "
                                "(run `make data` or data_tools/make_shards.py first)")
    tok = Tokenizer.load(tok_path)
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = tok.vocab_size
    elif cfg.model.vocab_size < tok.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tok.vocab_size}; set model.vocab_size=0 to take it from the tokenizer")
    return tok


def autocast(cfg: Config, device: torch.device):
    use_bf16 = cfg.train.precision == "bf16" or (cfg.train.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def forward_backward(engine, micro_batches: list[dict], cfg: Config, device: torch.device,
                     poison: bool = False) -> dict[str, torch.Tensor]:
    """Forward and backward of one optimizer step's micro-batches (gradient sync on the last);
    returns the loss terms averaged over them (this rank only). Shared by the trainer and
    bench/train_mfu.py, so the benchmark times the loop that trains. `poison`: fault injection,
    the loss becomes NaN (and so do the gradients), as a blow-up would make it."""
    sums: dict[str, torch.Tensor] = {}
    accum = cfg.train.grad_accum
    for i, mb in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with engine.micro_context(last), autocast(cfg, device):
            terms = engine.model(mb)
        if poison:
            terms = {**terms, "loss": terms["loss"] * float("nan")}
        engine.backward(terms["loss"], accum, last)
        for k, v in terms.items():
            v = v.detach().float()
            if accum > 1:
                v = v / accum
            sums[k] = sums[k] + v if k in sums else v
    return sums


class Trainer:
    def __init__(self, cfg: Config, dist_info: DistInfo | None = None):
        self.cfg = cfg
        self.d = dist_info or init_distributed(cfg.parallel.backend, force=needs_process_group(cfg.parallel))
        # SIGUSR2 / SIGTERM handlers, before the slow model build
        self.preemption = PreemptionFlag(self.d.device, cfg.train.preempt_grace_s)
        if self.d.device.type == "cpu":
            retain_freed_memory()  # reuse freed activations instead of page-faulting fresh ones each step
            if self.d.world_size > 1:
                torch.set_num_threads(max(1, torch.get_num_threads() // self.d.world_size))
        t = cfg.train
        if t.global_batch_size % (self.d.world_size * t.grad_accum):
            raise ConfigError(f"train.global_batch_size={t.global_batch_size} must be divisible by world size "
                              f"({self.d.world_size}) x train.grad_accum ({t.grad_accum})")
        self.run_dir = Path(cfg.run.dir)
        self.lock = None
        try:
            self.lock = self._lock_run_dir()  # released by fit() or close(); by the kernel if the process dies
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        self.tokenizer = resolve_vocab(cfg)
        self.train_dir, self.valid_dir = split_location(cfg, cfg.data.train_split), split_location(cfg, cfg.data.valid_split)
        self.resume_from = ckpt.latest_checkpoint(self.run_dir)
        if self.d.is_main:
            for left in ckpt.incomplete_checkpoints(self.run_dir):  # never a complete one: no trainer.json
                print(f"[resume] ignoring and removing {left}: an incomplete checkpoint write (the process died "
                      "while saving)")
                shutil.rmtree(left, ignore_errors=True)
        torch.manual_seed(t.seed)
        model = build_model(cfg.model, device="meta")  # materialised by the parallel layer, per shard
        self.n_params = count_params(model)
        self.flops_per_token = model.flops_per_token  # asked every step (family.py: it may change)
        self.model_summary = model.describe()
        # strategy applied from outside the model: DDP | FSDP2 | DeepSpeed ZeRO, optionally megatron TP
        init = functools.partial(init_model, seed=t.seed, pretrained=self.resume_from is None)
        self.engine = build_parallel(model, cfg, self.d.device, init=init)
        self.model, self.optimizer = self.engine.model, self.engine.optimizer
        self.dp_rank, self.dp_size = self.engine.dp_rank, self.engine.dp_size  # TP ranks share a batch
        bf16 = t.precision == "bf16" or (t.precision == "auto" and self.d.device.type == "cuda")
        self.peak_flops = device_peak(self.d.device, bf16)  # dense peak of one device (CPU: measured, cached)
        self.loader = TokenBatches(self.train_dir, global_batch_size=t.global_batch_size, rank=self.dp_rank,
                                   world_size=self.dp_size, seed=t.seed, num_workers=cfg.data.num_workers,
                                   mode=cfg.data.loader, seq_len=cfg.model.seq_len, on_corrupt=cfg.data.on_corrupt)
        self._check_data()
        self.step = 0
        self.skipped_nonfinite = self.nonfinite_in_a_row = 0  # steps skipped for a non-finite loss/grad: total, current run
        self.skipped_samples = 0  # unreadable samples replaced (data.on_corrupt=skip), over the whole run
        if self.resume_from is not None:
            self._resume(self.resume_from)

    def _check_data(self) -> None:
        """Before any step: both splits were written with data.path's tokenizer, and a resumed run
        trains on the tokenization it started with (the run dir keeps its tokenizer.json)."""
        check_tokenizer(self.loader.manifest, self.tokenizer, self.train_dir)
        valid = read_manifest(self.valid_dir)
        check_tokenizer(valid, self.tokenizer, self.valid_dir)
        if hasattr(self.valid_dir, "check_listed"):  # a brace pattern names exactly the manifest's shards
            self.valid_dir.check_listed(valid)
        own = self.run_dir / "tokenizer.json"
        if own.is_file() and Tokenizer.load(own).sha256 != self.tokenizer.sha256:
            raise ConfigError(f"{self.run_dir} was trained with the tokenizer in {own}, but {self.cfg.data.path} "
                              "holds another one: resuming would continue on differently tokenized data. Point "
                              "data.path at the run's data, or start a new run.dir")

    def _lock_run_dir(self) -> RunLock | None:
        """The main rank holds the run dir's lock; every rank stops if another run holds it."""
        lock, err = None, None
        if self.d.is_main:
            try:
                lock = RunLock(self.run_dir).acquire()
            except RunDirInUse as e:
                err = e
        if torch.distributed.is_initialized():
            ok = torch.tensor([0.0 if err else 1.0], device=self.d.device)
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
            if ok.item() == 0 and err is None:
                err = RunDirInUse(f"run.dir {self.run_dir} is in use by another training run (rank 0 says by whom)")
        if err is not None:
            if lock is not None:
                lock.release()
            raise err
        return lock

    def close(self) -> None:
        """Release the run dir and the signal handlers (fit() does, however it ends)."""
        self.preemption.restore()
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    # ------------------------------------------------------------------ state
    def _resume(self, path: Path) -> None:
        self._verify_checkpoint(path)
        state = ckpt.load_trainer_state(path)
        self._check_resumable(path, state)
        self.engine.load(path, state)
        self.loader.load_state_dict(state["loader"])
        self.step = state["step"]
        self.skipped_nonfinite = state.get("skipped_nonfinite", 0)
        self.nonfinite_in_a_row = state.get("nonfinite_in_a_row", 0)
        self.skipped_samples = state.get("skipped_samples", 0)
        rng = path / f"rng_rank{self.d.rank}.pt"
        if state["world_size"] == self.d.world_size and rng.is_file():
            ckpt.load_rng(rng)
        elif self.d.is_main:
            print(f"[resume] world size changed {state['world_size']} -> {self.d.world_size}: model and data "
                  "position restored; process RNG re-seeded (training noise is keyed per sample, unaffected)")
        if self.d.is_main:
            print(f"[resume] from {path} at step {self.step}")

    def _verify_checkpoint(self, path: Path) -> None:
        """Collective: the main rank checks the checkpoint's files against their record; all stop if not."""
        problems = ckpt.verify_checkpoint(path) if self.d.is_main else []
        bad = torch.tensor([1.0 if problems else 0.0], device=self.d.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
        if bad.item():
            older = [p for p in sorted(ckpt.checkpoint_dir(self.run_dir).glob("step_*")) if p < path]
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not match what was written: {'; '.join(problems) or 'see rank 0'}. It is "
                "corrupt and is not loaded. Move it aside (mv it out of checkpoints/) and re-run the same command "
                + (f"to resume from {older[-1].name}" if older else "to start over"))

    def _check_resumable(self, path: Path, state: dict) -> None:
        fmt, have = state.get("format", "safetensors"), self.engine.ckpt_format
        was = f"strategy={state.get('strategy', 'ddp')} tp={state.get('tp', 1)}"
        now = f"strategy={self.cfg.parallel.strategy} tp={self.cfg.parallel.tp}"
        if fmt != have:
            raise ConfigError(f"checkpoint {path} was written with {was} ({fmt} format) and this run uses {now} "
                              f"({have} format): resume with the same parallel settings, or export it with "
                              "launchers/export.py and start a new run from the exported weights")
        if state.get("tp", 1) != self.cfg.parallel.tp:
            raise ConfigError(f"checkpoint {path} was written with {was} and this run uses {now}: a changed "
                              "parallel.tp changes the checkpoint layout; resume with the same parallel.tp, or "
                              "export it with launchers/export.py and start a new run from the exported weights")
        if fmt == "deepspeed" and state["world_size"] != self.d.world_size:
            raise ConfigError(f"checkpoint {path} was written by {state['world_size']} processes and this run has "
                              f"{self.d.world_size}: DeepSpeed ZeRO partitions cannot be resharded on resume. Resume "
                              f"with {state['world_size']} processes, or export the checkpoint with "
                              "launchers/export.py and start a new run from it")

    def _trainer_state(self) -> dict:
        return {"step": self.step, "world_size": self.d.world_size, "loader": self.loader.state_dict(),
                "lr": lr_at(max(0, self.step - 1), self.cfg.train), "n_params": self.n_params,
                "format": self.engine.ckpt_format, "strategy": self.cfg.parallel.strategy, "tp": self.cfg.parallel.tp,
                "zero_stage": getattr(self.engine, "zero_stage", 0), "skipped_nonfinite": self.skipped_nonfinite,
                "nonfinite_in_a_row": self.nonfinite_in_a_row, "skipped_samples": self.skipped_samples}

    def save(self) -> Path:
        return ckpt.save_checkpoint(self.run_dir, self.step, unwrap(self.model), self.optimizer,
                                    self._trainer_state(), self.d.rank, self.cfg.train.keep_checkpoints,
                                    engine=self.engine, keep_every=self.cfg.train.keep_every,
                                    hashes=self.cfg.train.checkpoint_hashes,
                                    crash_before_commit=self.step == self.cfg.train.inject_kill_in_checkpoint)

    def full_model(self) -> torch.nn.Module | None:
        """Collective: a plain, unsharded copy of the model on rank 0 (None elsewhere), for
        sampling and export whatever the strategy."""
        state = self.engine.full_state_dict()
        if state is None:
            return None
        if self.engine.strategy == "ddp" and self.engine.tp == 1:
            return unwrap(self.model)
        model = build_model(self.cfg.model, init_pretrained=False)
        ckpt.load_state_into(model, state, "consolidated state")
        return model.to(self.d.device)

    def _write_memory_report(self) -> None:
        """memory/rank{R}.json: this rank's parameter and optimizer-state bytes after its first
        step (what lflm_dist.parallel.plan predicts), plus peak memory."""
        d = self.run_dir / "memory"
        d.mkdir(parents=True, exist_ok=True)
        rep = {"rank": self.d.rank, "world_size": self.d.world_size, "strategy": self.cfg.parallel.strategy,
               "tp": self.cfg.parallel.tp, "zero_stage": getattr(self.engine, "zero_stage", 0),
               **self.engine.memory_bytes(), "peak_mem_mb": peak_memory_mb(self.d.device)}
        (d / f"rank{self.d.rank}.json").write_text(json.dumps(rep, indent=1))

    # ------------------------------------------------------------------ loop
    def _micro_batches(self, batch: dict, step: int):
        t = self.cfg.train
        x = batch["input_ids"]
        b = x.shape[0]
        keys = sample_keys(t.seed, step, self.dp_rank * b, b)
        m = b // t.grad_accum
        for i in range(t.grad_accum):
            yield {"input_ids": x[i * m:(i + 1) * m].to(self.d.device), "noise_key": keys[i * m:(i + 1) * m].to(self.d.device)}

    def train_step(self, batch: dict) -> dict[str, float]:
        t, eng = self.cfg.train, self.engine
        eng.set_lr(lr_at(self.step, t))
        sums = forward_backward(eng, list(self._micro_batches(batch, self.step)), self.cfg, self.d.device,
                                poison=self.step + 1 in t.inject_nonfinite_steps)
        grad_norm = eng.clip_grad_norm(t.grad_clip if t.grad_clip > 0 else float("inf"))
        names = sorted(sums)
        # TP ranks of one data-parallel replica hold equal losses, so the mean over all ranks is the DP mean
        vals = all_reduce_mean(torch.stack([sums[k] for k in names]))
        out = dict(zip(names, vals.tolist()))
        if self.loader.skip:  # unreadable samples replaced in this step's global batch
            n = torch.tensor([float(batch.get("corrupt_skipped", 0))], device=self.d.device)
            self.skipped_samples += int(round(all_reduce_mean(n).item() * self.dp_size))
            out["skipped_samples"] = self.skipped_samples
        gn = float(grad_norm) if grad_norm is not None else None  # global: every rank decides alike
        if not math.isfinite(out["loss"]) or (gn is not None and not math.isfinite(gn)):
            self._skip_nonfinite(out, gn)
        else:
            eng.step()
            eng.update_statistics()
            self.nonfinite_in_a_row = 0
            out["grad_norm"] = gn if gn is not None else eng.grad_norm_after_step()
        self.step += 1
        out["lr"] = lr_at(self.step - 1, t)
        out["skipped_nonfinite"] = self.skipped_nonfinite
        return out

    def _skip_nonfinite(self, out: dict, grad_norm: float | None) -> None:
        """No update for this step: count it, record its samples, and stop after
        train.nonfinite_patience in a row (DeepSpeed steps inside its engine: it always stops)."""
        t, step = self.cfg.train, self.step + 1
        self.skipped_nonfinite += 1
        self.nonfinite_in_a_row += 1
        if self.d.is_main:
            with open(self.run_dir / "nonfinite_batches.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "loss": str(out["loss"]), "grad_norm": str(grad_norm),
                                    "sample_indices": self.loader.global_indices(step - 1),
                                    "split": str(self.train_dir)}) + "\n")
        first = step - self.nonfinite_in_a_row + 1
        self.engine.discard_gradients()
        if self.engine.strategy == "deepspeed" or self.nonfinite_in_a_row >= max(1, t.nonfinite_patience):
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {step}: {out}"
                + (f" ({self.nonfinite_in_a_row} steps in a row, {first}..{step}, train.nonfinite_patience="
                   f"{t.nonfinite_patience})" if self.nonfinite_in_a_row > 1 else "")
                + f". Nothing was updated at these steps; the newest checkpoint in {ckpt.checkpoint_dir(self.run_dir)} "
                f"is from before them; the batches' sample indices are in {self.run_dir / 'nonfinite_batches.jsonl'}. "
                "Lower train.lr, raise train.warmup_steps or check the data, then re-run the same command to resume.")
        out["grad_norm"] = float("nan")

    @torch.no_grad()
    def evaluate(self, max_batches: int | None = None) -> dict[str, float]:
        """Mean loss terms over validation batches; noise keys fixed per sample position so
        the numbers do not depend on world size."""
        model = self.model
        model.eval()
        b = max(1, self.cfg.train.global_batch_size // self.dp_size)
        sums, n = {}, 0
        # DDP: call the module itself (no buffer broadcast); sharded strategies need their forward hooks
        fwd = unwrap(model).loss if self.engine.strategy == "ddp" else model
        for i, batch in enumerate(eval_batches(self.valid_dir, batch_size=b * self.dp_size, rank=self.dp_rank,
                                               world_size=self.dp_size, max_batches=max_batches,
                                               seq_len=self.cfg.model.seq_len)):
            x = batch["input_ids"].to(self.d.device)
            keys = sample_keys(EVAL_SEED, i, self.dp_rank * x.shape[0], x.shape[0]).to(self.d.device)
            with autocast(self.cfg, self.d.device):
                terms = fwd({"input_ids": x, "noise_key": keys})
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + v.float()
            n += 1
        model.train()
        if n == 0:
            return {}
        names = sorted(sums)
        vals = all_reduce_mean(torch.stack([sums[k] / n for k in names]))
        return dict(zip(names, vals.tolist()))

    def fit(self, stop_at: int | None = None) -> dict[str, float]:
        """Train to train.max_steps (or return early after `stop_at` steps, as a crash would:
        no extra checkpoint, no final evaluation), then evaluate on the validation split and
        mark the run dir DONE. On SIGUSR2 or SIGTERM: checkpoint, then raise `Preempted`.
        However it ends, the run dir's lock is released."""
        try:
            return self._fit(stop_at)
        finally:
            self.close()

    def _fit(self, stop_at: int | None) -> dict[str, float]:
        cfg, t = self.cfg, self.cfg.train
        if self.d.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")
            if self.step < t.max_steps:
                ckpt.clear_done(self.run_dir)  # a raised max_steps makes a finished run unfinished
            self.tokenizer.save(self.run_dir / "tokenizer.json")
        barrier()
        logger = MetricsLogger(cfg, self.run_dir, self.d.is_main, resume_step=self.step,
                               extra={"n_params": self.n_params, "world_size": self.d.world_size,
                                      "strategy": cfg.parallel.strategy, "tp": cfg.parallel.tp})
        if self.d.is_main:
            print(f"[train] {cfg.model.family} {self.model_summary} "
                  f"params={self.n_params / 1e6:.2f}M world={self.d.world_size} strategy={cfg.parallel.strategy} "
                  f"tp={cfg.parallel.tp} device={self.d.device} optimizer={self.engine.optimizer_name} "
                  f"global_batch={t.global_batch_size}x{cfg.model.seq_len} steps={self.step}->{t.max_steps}")
        tokens_per_step = t.global_batch_size * cfg.model.seq_len
        bar = logger.progress(self.step, t.max_steps)
        first_step = self.step
        it = iter(self.loader)
        try:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                batch = next(it)
                out = self.train_step(batch)
                dt = time.perf_counter() - t0
                flops = self.flops_per_token() * tokens_per_step / dt
                out.update(step=self.step, step_time_s=dt, tokens_per_s=tokens_per_step / dt, flops_per_s=flops,
                           mfu=flops / (self.peak_flops * self.d.world_size) if self.peak_flops else 0.0,
                           peak_mem_mb=peak_memory_mb(self.d.device))
                if self.step == first_step + 1:
                    self._write_memory_report()
                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    logger.log(out)
                bar.update(1)
                bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{out['tokens_per_s']:.0f}")
                if t.eval_every and self.step % t.eval_every == 0:
                    logger.log({"step": self.step, **{f"valid/{k}": v for k, v in self.evaluate(t.eval_batches).items()}})
                preempted = self.preemption.requested()  # collective: every rank stops at this step
                # no checkpoint inside a run of skipped steps: the newest stays the one from before them
                due = (self.step % t.ckpt_every == 0 or self.step == t.max_steps) and not self.nonfinite_in_a_row
                saved = None
                if preempted or due:
                    saved = self.save()
                if preempted:
                    logger.close()
                    raise Preempted(self.step, saved, requeue=preempted >= 2)
                if stop_at is not None and self.step >= stop_at:
                    logger.close()
                    return {}
        finally:
            bar.close()
        final = self.evaluate(t.eval_batches)
        logger.log({"step": self.step, **{f"valid/{k}": v for k, v in final.items()}})
        logger.close()
        if self.d.is_main:
            ckpt.mark_done(self.run_dir, self.step)
        return final
