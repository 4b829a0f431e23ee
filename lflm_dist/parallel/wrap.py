"""Apply the configured parallel strategy to a built model, from outside it (torchtitan's
`parallelize`): TP swap -> activation checkpointing / compile -> DDP | FSDP2 | DeepSpeed."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from lflm_dist.config import SUPPORTED_PARALLEL, Config, ConfigError, ParallelConfig


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    if isinstance(model, DistributedDataParallel):
        return model.module
    if hasattr(model, "module") and type(model).__name__ == "DeepSpeedEngine":
        return model.module
    return model


def needs_process_group(cfg: ParallelConfig) -> bool:
    """FSDP2, DeepSpeed and TP need a process group even with one process."""
    return cfg.strategy != "ddp" or cfg.tp > 1


def build_parallel(model: torch.nn.Module, cfg: Config, device: torch.device, init=None):
    """Return an `Engine` (lflm_dist.parallel.engine) driving `model` under cfg.parallel.

    A model built on the meta device is materialised by `init(model, device)`
    (lflm_dist.models.registry.init_model): under FSDP2 after `fully_shard`, so each rank
    allocates and initialises only its shard and host/device memory per rank scale with
    1/world size; otherwise before wrapping (DDP replicates, DeepSpeed partitions a full
    model, TP slices a full host copy into its shards)."""
    from lflm_dist.parallel import engine as E
    from lflm_dist.parallel.fsdp import apply_activation_checkpointing, apply_compile, apply_fsdp2, mixed_precision
    from lflm_dist.train.optim import build_optimizer
    p, world = cfg.parallel, (dist.get_world_size() if dist.is_initialized() else 1)
    if world % p.tp:
        raise ConfigError(f"parallel.tp={p.tp} must divide the number of processes ({world}); "
                          f"supported combinations: {SUPPORTED_PARALLEL}")
    dp_rank, dp_size = (dist.get_rank() if dist.is_initialized() else 0), world
    meta = any(t.is_meta for t in model.parameters())
    if meta and init is None:
        raise ValueError("build_parallel got a meta-device model and no `init` to materialise it")
    from lflm_dist.parallel import tp as tpmod
    if p.tp > 1:
        tpmod.tp_plan(model)  # a family without a TP plan fails here, before any weight is allocated
    sharded_init = meta and p.strategy == "fsdp2" and p.tp == 1
    if meta and not sharded_init:
        init(model, "cpu" if p.tp > 1 else device)
    if not sharded_init:
        model = model.to(device)
    if p.tp > 1:
        tpmod.init_tp(p.tp)
        tpmod.apply_tp(model, p.tp)
        _, _, dp_rank, dp_size = tpmod.coords()
    tp_info = tpmod.tp_info(model) if p.tp > 1 else None  # before FSDP2 replaces the parameters
    if p.activation_checkpointing:
        apply_activation_checkpointing(model)
    if p.compile:
        apply_compile(model)

    if p.strategy == "ddp":
        wrapped = model
        if dp_size > 1:
            group = None
            if p.tp > 1:
                from lflm_dist.parallel import tp as tpmod
                group = tpmod.dp_group()
            wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                              process_group=group)
        return E.DDPEngine(model, wrapped, build_optimizer(model, cfg.train), dp_rank, dp_size, tp=p.tp,
                           tp_info=tp_info, device_type=device.type)

    if p.strategy == "fsdp2":
        from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
        if p.tp > 1:  # shard over the data-parallel group only; the TP layers keep their TP shards
            from lflm_dist.parallel import tp as tpmod
            mesh = DeviceMesh.from_group(tpmod.dp_group(), device.type, mesh_dim_names=("dp",))
        else:
            mesh = init_device_mesh(device.type, (world,))
        apply_fsdp2(model, mesh, mixed_precision(device, cfg.train.precision))
        if sharded_init:
            init(model, device)
        return E.FSDPEngine(model, model, build_optimizer(model, cfg.train), dp_rank, dp_size, tp=p.tp,
                            tp_info=tp_info, device_type=device.type)

    if p.strategy == "deepspeed":
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed
        ds_cfg = deepspeed_config(cfg, world, device)
        opt = build_optimizer(model, cfg.train, cpu_offload=p.offload_optimizer)
        fp32_buffers = {n for n, b in model.named_buffers() if b.dtype == torch.float32}
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt,
                                               config=ds_cfg, dist_init_required=False)
        # running statistics (the VAE's latent shift/scale) stay fp32 under bf16: DeepSpeed 0.19 keeps
        # buffers unless a ds_config sets a buffer dtype; this holds for any ds_config
        for name, buf in list(engine.module.named_buffers()):
            if name in fp32_buffers and buf.dtype != torch.float32:
                owner, _, attr = name.rpartition(".")
                engine.module.get_submodule(owner)._buffers[attr] = buf.float()
        return E.DeepSpeedEngine(engine, ds_cfg["zero_optimization"]["stage"], dp_rank, dp_size)
    raise ConfigError(f"parallel.strategy={p.strategy!r}; supported: {SUPPORTED_PARALLEL}")


def deepspeed_config(cfg: Config, world: int, device: torch.device) -> dict:
    """DeepSpeed config: parallel.ds_config (JSON) if given, with batch sizes, clipping,
    precision and the ZeRO stage / offload taken from this run's config."""
    p, t = cfg.parallel, cfg.train
    base = json.loads(Path(p.ds_config).read_text()) if p.ds_config else {}
    zero = dict(base.get("zero_optimization", {}))
    zero["stage"] = p.zero_stage or zero.get("stage", 1)
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": device.type == "cuda"}
    bf16 = t.precision == "bf16" or (t.precision == "auto" and device.type == "cuda")
    base.update({
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.global_batch_size // (world * t.grad_accum),
        "gradient_accumulation_steps": t.grad_accum,
        "gradient_clipping": t.grad_clip if t.grad_clip > 0 else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
    })
    base.setdefault("steps_per_print", 10 ** 9)
    base.setdefault("wall_clock_breakdown", False)
    return base
