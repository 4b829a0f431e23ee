"""Body of launchers/pretrain.py: train, then report validation terms and samples."""
from __future__ import annotations

import sys

from lflm_dist.config import load_config
from lflm_dist.data.loader import eval_batches
from lflm_dist.data.shards import ShardError
from lflm_dist.generate import can_sample, generate_text, reconstruct_text
from lflm_dist.parallel import unwrap
from lflm_dist.train import preemption
from lflm_dist.train.dist import barrier, destroy
from lflm_dist.train.trainer import NonFiniteLossError, Trainer


def main(config_path: str, overrides: list[str]) -> int:
    try:
        cfg = load_config(config_path, overrides)
        trainer = Trainer(cfg)
        final = trainer.fit()
    except preemption.Preempted as e:  # checkpoint complete on every rank (save ends in a barrier)
        if trainer.d.is_main:
            print(f"[preempt] signal {e.signal.name}: stopped after step {e.step}, checkpoint {e.checkpoint}",
                  flush=True)
            if e.requeue:
                preemption.requeue()
            else:
                print("[preempt] not requeued (SIGTERM); re-run the same command to resume", flush=True)
        barrier()  # others exit after the requeue, so srun --kill-on-bad-exit cannot cut it short
        destroy()
        # non-zero either way: the batch script must not start the next stage
        return preemption.EXIT_CODE if e.requeue else preemption.STOP_EXIT_CODE
    except (ValueError, FileNotFoundError, ShardError, NonFiniteLossError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        destroy()
        return 2
    # collective: sharded strategies (FSDP2, ZeRO-3, TP) gather a plain model on rank 0 to sample
    plain = trainer.full_model() if trainer.cfg.sample.num_samples > 0 else None
    if trainer.d.is_main:
        print("\nvalidation: " + "  ".join(f"{k}={v:.4f}" for k, v in final.items()))
        report_samples(trainer, plain)
    barrier()
    destroy()
    return 0


def report_samples(trainer: Trainer, model=None) -> None:
    model, tok, s = model if model is not None else unwrap(trainer.model), trainer.tokenizer, trainer.cfg.sample
    if s.num_samples <= 0:
        return
    if can_sample(model):
        texts = generate_text(model, tok, [s.prompt] * s.num_samples, s, seed=trainer.cfg.train.seed)
        for i, t in enumerate(texts):
            print(f"\n--- sample {i} (prompt {s.prompt!r}, {s.steps} steps, guidance {s.guidance}) ---\n{s.prompt}{t}")
    else:
        batch = next(iter(eval_batches(trainer.valid_dir, batch_size=s.num_samples, seq_len=trainer.cfg.model.seq_len)))
        print(f"\nno samples: {model.sampling_unavailable()}; reconstructions of validation text instead")
        for i, (orig, rec) in enumerate(reconstruct_text(model, tok, batch["input_ids"])):
            print(f"\n--- reconstruction {i} ---\n[in ] {orig!r}\n[out] {rec!r}")
    model.train()
