"""What the trainer drives, one class per strategy: the module to call, the optimizer, the
data-parallel coordinates, gradient sync / clipping / stepping, collective checkpoint
save / load, and a consolidated (unsharded) state dict for sampling and export.

  DDPEngine       plain / DDP, and megatron TP (x DDP over the data-parallel group)
  FSDPEngine      FSDP2 fully_shard per block + root
  DeepSpeedEngine ZeRO 1/2/3 through deepspeed.initialize with our AdamW as client optimizer
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from safetensors.torch import load_file, save_file

from lflm_dist.parallel import tp as tpmod

DCP_DIR = "dcp"
DS_TAG = "deepspeed"


def _opt_bytes(optimizer) -> int:
    n = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                v = v.to_local() if hasattr(v, "to_local") else v
                n += v.numel() * v.element_size()
    return n


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class Engine:
    strategy = "ddp"
    ckpt_format = "safetensors"

    def __init__(self, module: nn.Module, model: nn.Module, optimizer, dp_rank: int, dp_size: int, tp: int = 1):
        self.module, self.model, self.optimizer = module, model, optimizer
        self.dp_rank, self.dp_size, self.tp = dp_rank, dp_size, tp

    # ------------------------------------------------------------------ step
    def micro_context(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, grad_accum: int, last: bool) -> None:
        (loss / grad_accum).backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        n = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], max_norm)
        return n.full_tensor() if hasattr(n, "full_tensor") else n

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm_after_step(self) -> float:
        return float("nan")

    def set_lr(self, lr: float) -> None:
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    # ------------------------------------------------------------------ state
    def save(self, tmp: Path, rank: int) -> None:
        """Collective: write model + optimizer state into `tmp` (exists on every rank)."""
        if rank == 0:
            save_file({k: v.detach().cpu().contiguous() for k, v in self.module.state_dict().items()},
                      tmp / "model.safetensors")
            torch.save(self.optimizer.state_dict(), tmp / "optimizer.pt")

    def load(self, path: Path, meta: dict) -> None:
        state = load_file(str(path / "model.safetensors"))
        missing, unexpected = self.module.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {path} does not match the model: missing keys {missing[:5]}, "
                               f"unexpected keys {unexpected[:5]}; was it written with a different model config?")
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))

    def full_state_dict(self) -> dict | None:
        """Collective: the unsharded model state (FQN -> CPU tensor) on rank 0, None elsewhere."""
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()}

    def memory_bytes(self) -> dict[str, int]:
        """This rank's bytes of parameters (trainable) and optimizer state."""
        params = sum(_local(p).numel() * p.element_size() for p in self.module.parameters() if p.requires_grad)
        return {"params": params, "optimizer": _opt_bytes(self.optimizer)}


# ----------------------------------------------------------------------------- DCP helpers
def _tp_mesh(device_type: str):
    from torch.distributed.device_mesh import DeviceMesh
    return DeviceMesh.from_group(tpmod.tp_group(), device_type)


def _to_dtensor(t: torch.Tensor, spec: tuple, mesh) -> torch.Tensor:
    from torch.distributed.tensor import DTensor, Shard
    view, dim = spec
    lview = list(view)
    lview[dim] //= mesh.size()
    stride, acc = [], 1
    for s in reversed(view):
        stride.insert(0, acc)
        acc *= s
    return DTensor.from_local(t.reshape(lview), mesh, [Shard(dim)], run_check=False, shape=torch.Size(view),
                              stride=tuple(stride))


def _tp_wrap(state: dict, specs: dict, mesh) -> dict:
    """Model / optimizer state dicts with TP shards as DTensors of the canonical view."""
    msd, osd = state["model"], state["optim"]
    msd = {k: _to_dtensor(v, specs[k], mesh) if k in specs else v for k, v in msd.items()}
    ost = {}
    for fqn, st in osd["state"].items():
        ost[fqn] = {k: _to_dtensor(v, specs[fqn], mesh) if fqn in specs and torch.is_tensor(v) and v.dim() > 0 else v
                    for k, v in st.items()}
    return {"model": msd, "optim": {**osd, "state": ost}}


def _tp_unwrap(state: dict, shapes: dict) -> dict:
    def un(v, shape):
        return v.to_local().reshape(shape) if hasattr(v, "to_local") else v
    msd = {k: un(v, shapes[k]) if k in shapes else v for k, v in state["model"].items()}
    ost = {fqn: {k: un(v, shapes[fqn]) if fqn in shapes else v for k, v in st.items()}
           for fqn, st in state["optim"]["state"].items()}
    return {"model": msd, "optim": {**state["optim"], "state": ost}}


class DCPMixin:
    ckpt_format = "dcp"

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.module, self.optimizer)
        state = {"model": msd, "optim": osd}
        if self.tp > 1:
            state = _tp_wrap(state, tpmod.tp_specs(self.module), _tp_mesh(self.device_type))
        return state

    def save(self, tmp: Path, rank: int) -> None:
        import torch.distributed.checkpoint as dcp
        dcp.save(self._state(), checkpoint_id=str(tmp / DCP_DIR))

    def load(self, path: Path, meta: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict
        state = self._state()
        dcp.load(state, checkpoint_id=str(path / DCP_DIR))
        if self.tp > 1:
            shapes = {n: p.shape for n, p in self.module.named_parameters() if tpmod.is_tp_param(p)}
            state = _tp_unwrap(state, shapes)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


class DDPEngine(Engine):
    """One process, DDP, or megatron TP (optionally x DDP over the data-parallel group)."""

    def __init__(self, *a, device_type: str = "cpu", **kw):
        super().__init__(*a, **kw)
        self.device_type = device_type
        if self.tp > 1:
            self.ckpt_format = "dcp"

    def micro_context(self, last: bool):
        return self.model.no_sync() if not last and hasattr(self.model, "no_sync") else contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        if self.tp == 1:
            return super().clip_grad_norm(max_norm)
        tpmod.sync_partial_grads(self.module)
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        norm = tpmod.tp_grad_norm_sq(params).sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for p in params:
            p.grad.detach().mul_(coef.to(p.grad.dtype))
        return norm

    def save(self, tmp: Path, rank: int) -> None:
        (DCPMixin.save if self.tp > 1 else Engine.save)(self, tmp, rank)

    def load(self, path: Path, meta: dict) -> None:
        (DCPMixin.load if self.tp > 1 else Engine.load)(self, path, meta)

    _state = DCPMixin._state

    def full_state_dict(self) -> dict | None:
        if self.tp == 1:
            return super().full_state_dict()
        specs = tpmod.tp_specs(self.module)
        out = {}
        for k, v in self.module.state_dict().items():
            if k.endswith("._extra_state"):
                continue
            if k in specs:
                v = tpmod.gather_full(v, specs[k], tpmod.tp_group())
            out[k] = v.detach().cpu().clone()
        return out if dist.get_rank() == 0 else None


class FSDPEngine(DCPMixin, Engine):
    strategy = "fsdp2"

    def __init__(self, *a, device_type: str = "cpu", **kw):
        super().__init__(*a, **kw)
        self.device_type = device_type

    def micro_context(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if dist.get_rank() == 0 else None


class DeepSpeedEngine(Engine):
    strategy = "deepspeed"
    ckpt_format = "deepspeed"

    def __init__(self, engine, zero_stage: int, dp_rank: int, dp_size: int):
        super().__init__(engine.module, engine, engine.optimizer, dp_rank, dp_size)
        self.engine, self.zero_stage = engine, zero_stage

    def backward(self, loss, grad_accum, last):
        self.engine.backward(loss)  # deepspeed divides by gradient_accumulation_steps itself
        if not last:
            self.engine.step()  # not a boundary: only advances deepspeed's micro-step counter

    def clip_grad_norm(self, max_norm):
        return None  # deepspeed clips inside step() (gradient_clipping in its config)

    def step(self):
        self.engine.step()

    def grad_norm_after_step(self) -> float:
        n = self.engine.get_global_grad_norm()
        return float(n) if n is not None else float("nan")

    def set_lr(self, lr):
        for g in self.engine.optimizer.param_groups:
            g["lr"] = lr

    def save(self, tmp: Path, rank: int) -> None:
        self.engine.save_checkpoint(str(tmp), tag=DS_TAG, save_latest=False)

    def load(self, path: Path, meta: dict) -> None:
        if meta.get("zero_stage") != self.zero_stage:
            raise RuntimeError(f"checkpoint {path} was written with ZeRO stage {meta.get('zero_stage')}, this run uses "
                               f"stage {self.zero_stage}: resume with the same parallel.zero_stage, or convert it "
                               "with launchers/export.py and start a new run from the exported weights")
        load_path, _ = self.engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True,
                                                   load_lr_scheduler_states=False)
        if load_path is None:
            raise RuntimeError(f"deepspeed could not load {path}/{DS_TAG}")

    def full_state_dict(self) -> dict | None:
        if self.zero_stage == 3:
            import deepspeed
            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
                sd = {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()} \
                    if dist.get_rank() == 0 else None
            return sd
        return super().full_state_dict()

    def memory_bytes(self) -> dict[str, int]:
        """fp32 master partitions count as optimizer state (the ZeRO paper's K = 12 bytes)."""
        if self.zero_stage == 3:
            params = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in self.module.parameters()
                         if p.requires_grad)
        else:
            params = sum(p.numel() * p.element_size() for p in self.module.parameters() if p.requires_grad)
        zopt = self.engine.optimizer
        inner = zopt.optimizer
        flat = (getattr(zopt, "fp32_partitioned_groups_flat", None) if self.zero_stage == 3 else
                getattr(zopt, "single_partition_of_fp32_groups", None))
        if flat is None:
            flat = [p for g in inner.param_groups for p in g["params"]]
        master = sum(p.numel() * p.element_size() for p in flat)
        return {"params": params, "optimizer": _opt_bytes(inner) + master}
