"""The Text VAE's latent statistics (shift/scale normalising the prior's input) are updated
once per optimizer step from the whole global batch, summed over micro-batches and
data-parallel ranks: on two real gloo ranks each seeing half a batch, both hold the same
statistics as one process seeing all of it. Stage 2 without stage-1 statistics is an error
unless the run says how they are set."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lflm_dist.config import ConfigError, load_config
from lflm_dist.models.noise import sample_keys
from lflm_dist.models.registry import build_model
from test_init import _free_port

CFG = ["model.vocab_size=97", "model.seq_len=32", "model.vae.encoder.dim=32", "model.vae.decoder.dim=32",
       "model.vae.encoder.n_heads=2", "model.vae.decoder.n_heads=2", "model.vae.latent_stats_momentum=0.5"]


def batch(rows: slice) -> dict:
    x = torch.randint(0, 97, (8, 32), generator=torch.Generator().manual_seed(0))
    return {"input_ids": x[rows], "noise_key": sample_keys(0, 0, 0, 8)[rows]}


def stats_after(model, parts: list[slice], all_reduce_sum=None) -> torch.Tensor:
    model.train()
    for _ in range(2):  # two optimizer steps, each over its micro-batches
        for rows in parts:
            model.loss(batch(rows))
        model.vae.update_statistics(all_reduce_sum)
    return torch.cat([model.vae.latent_shift, model.vae.latent_scale])


def _worker(rank, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        model = build_model(load_config(None, CFG).model, seed=1)
        mine = [slice(4 * rank, 4 * rank + 2), slice(4 * rank + 2, 4 * rank + 4)]  # 2 micro-batches per rank
        torch.save(stats_after(model, mine, dist.all_reduce), f"{out}/rank{rank}.pt")
        dist.barrier()  # no rank tears gloo down while its peer may still be in the last collective
    finally:
        dist.destroy_process_group()


def test_statistics_equal_on_every_rank_and_to_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert torch.equal(r0, r1)
    one = stats_after(build_model(load_config(None, CFG).model, seed=1), [slice(0, 8)])
    torch.testing.assert_close(r0, one, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(one[:16], torch.zeros(16))  # statistics moved from the identity
    # a rank on its own (the old per-rank EMA) would hold something else
    alone = stats_after(build_model(load_config(None, CFG).model, seed=1), [slice(0, 4)])
    assert not torch.allclose(alone, one, rtol=1e-3)


def test_stage2_without_stage1_statistics_must_say_how_they_are_set():
    stage2 = CFG + ["model.cola.stage=2", "model.cola.lambda_ref=0"]
    with pytest.raises(ConfigError, match="latent_stats=track"):
        load_config(None, stage2)
    tracked = build_model(load_config(None, stage2 + ["model.cola.latent_stats=track"]).model)
    assert tracked.vae.track_latent_stats
    fixed = build_model(load_config(None, stage2 + ["model.cola.latent_stats=identity"]).model)
    assert not fixed.vae.track_latent_stats
    assert torch.equal(fixed.vae.latent_scale, torch.ones(16))
