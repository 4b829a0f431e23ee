"""Meta-device construction and per-shard materialisation (lflm_dist.models.init), on two
real gloo processes under FSDP2:
- every rank holds only its shard of each parameter, equal to the matching slice of the
  one-process init (so every strategy and world size starts from the same weights);
- a rank's peak memory while building and initialising stays well under the full model's
  bytes (building the full model first and sharding it after would exceed them);
- stage-1 weights load into a sharded stage-2 Cola model (vae.* and the frozen reference
  encoder) from a safetensors and from a DCP checkpoint, equal to the stage-1 values."""
import json
import os
import resource
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lflm_dist.config import load_config
from lflm_dist.models.registry import build_model, init_model

BIG = ["model.family=ar", "model.vocab_size=512", "model.ar.net.dim=1024", "model.ar.net.n_layers=8",
       "model.ar.net.n_heads=8"]  # ~100M parameters, 0.4 GB in fp32
STAGE2 = ["model.vocab_size=97", "model.seq_len=32", "model.vae.encoder.dim=32", "model.vae.decoder.dim=32",
          "model.vae.encoder.n_heads=2", "model.vae.decoder.n_heads=2", "model.dit.net.dim=32",
          "model.dit.net.n_heads=2", "model.dit.block_size=8", "model.cola.stage=2"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _shard(model):
    from torch.distributed.device_mesh import init_device_mesh

    from lflm_dist.parallel.fsdp import apply_fsdp2
    apply_fsdp2(model, init_device_mesh("cpu", (dist.get_world_size(),)), None)


def _worker(rank, world, port, out_dir, task, ckpt):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        if task == "big":
            # warm the same path on a tiny model first, so imports and allocator set-up are not counted
            tiny = build_model(load_config(None, BIG[:2] + ["model.ar.net.dim=32", "model.ar.net.n_heads=2"]).model,
                               device="meta")
            _shard(tiny)
            init_model(tiny, "cpu", seed=7, pretrained=False)
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            cfg = load_config(None, BIG)
            model = build_model(cfg.model, device="meta")
            _shard(model)
            init_model(model, "cpu", seed=7, pretrained=False)
            grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
            local = {n: p.to_local().clone() for n, p in model.named_parameters()}
            torch.save({"grew": grew, "local": local}, f"{out_dir}/rank{rank}.pt")
        else:
            cfg = load_config(None, STAGE2 + [f"model.cola.ref_checkpoint={ckpt}"])
            model = build_model(cfg.model, device="meta")
            _shard(model)
            init_model(model, "cpu", seed=7, pretrained=True)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            if rank == 0:
                torch.save(full, f"{out_dir}/full.pt")
        # a rank that tears gloo down while its peer is still in (or just past) the last collective
        # can abort in gloo's transport threads ("terminate called without an active exception")
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, task, ckpt=""):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path), task, ckpt), nprocs=2, join=True)


def test_fsdp2_ranks_materialise_only_their_shard_of_the_same_init(tmp_path):
    _spawn(tmp_path, "big")
    ref = build_model(load_config(None, BIG).model, seed=7)  # one process, unsharded
    full_bytes = sum(p.numel() * 4 for p in ref.parameters())
    assert full_bytes > 3e8
    got = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for name, p in ref.named_parameters():
        a, b = got[0]["local"][name], got[1]["local"][name]
        assert a.shape[0] + b.shape[0] == p.shape[0], name  # dim-0 shards, nothing duplicated
        assert torch.equal(torch.cat([a, b]), p.detach()), name
    for r in got:  # shards (half) + one full parameter at a time, never the whole model
        assert r["grew"] < 0.75 * full_bytes, (r["grew"], full_bytes)


def _stage1_weights(tmp_path):
    cfg = load_config(None, STAGE2[:-1] + ["model.cola.stage=1"])
    stage1 = build_model(cfg.model, seed=3)
    with torch.no_grad():  # statistics a stage-1 run would have tracked
        stage1.vae.latent_shift.uniform_(-1, 1)
        stage1.vae.latent_scale.uniform_(0.5, 2)
    return {k: v.detach().clone() for k, v in stage1.state_dict().items()}


def _check_loaded(full, stage1):
    vae = {k: v for k, v in stage1.items() if k.startswith("vae.")}
    assert vae
    for k, v in vae.items():
        assert torch.equal(full[k], v), k
        if k.startswith("vae.encoder."):
            assert torch.equal(full["ref_encoder." + k[len("vae.encoder."):]], v), k


def test_stage1_weights_load_into_sharded_stage2_from_safetensors(tmp_path):
    from safetensors.torch import save_file
    stage1 = _stage1_weights(tmp_path)
    ckpt = tmp_path / "stage1"
    ckpt.mkdir()
    save_file(stage1, ckpt / "model.safetensors")
    _spawn(tmp_path, "load", str(ckpt))
    _check_loaded(torch.load(tmp_path / "full.pt"), stage1)


def test_stage1_weights_load_into_sharded_stage2_from_dcp(tmp_path):
    import torch.distributed.checkpoint as dcp
    stage1 = _stage1_weights(tmp_path)
    ckpt = tmp_path / "stage1_dcp"
    dcp.save({"model": stage1}, checkpoint_id=str(ckpt / "dcp"))
    (ckpt / "trainer.json").write_text(json.dumps({"format": "dcp", "step": 1}))
    _spawn(tmp_path, "load", str(ckpt))
    _check_loaded(torch.load(tmp_path / "full.pt"), stage1)


def test_pretrained_checkpoint_missing_modules_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file
    stage1 = {k: v for k, v in _stage1_weights(tmp_path).items() if not k.startswith("vae.decoder.")}
    ckpt = tmp_path / "partial"
    ckpt.mkdir()
    save_file(stage1, ckpt / "model.safetensors")
    cfg = load_config(None, STAGE2 + [f"model.cola.ref_checkpoint={ckpt}"])
    with pytest.raises(RuntimeError, match="lack .*vae.decoder"):
        build_model(cfg.model)
