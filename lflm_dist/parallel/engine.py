"""What the trainer drives, one class per strategy: the module to call, the optimizer, the
data-parallel coordinates, gradient sync / clipping / stepping, collective checkpoint
save / load, and a consolidated (unsharded) state dict for sampling and export.

  DDPEngine       plain / DDP, and megatron TP (x DDP over the data-parallel group)
  FSDPEngine      FSDP2 fully_shard per block + root (with TP: over the data-parallel group)
  DeepSpeedEngine ZeRO 1/2/3 through deepspeed.initialize with our AdamW as client optimizer
"""
from __future__ import annotations

import contextlib
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

    def __init__(self, module: nn.Module, model: nn.Module, optimizer, dp_rank: int, dp_size: int, tp: int = 1,
                 tp_info: dict | None = None):
        self.module, self.model, self.optimizer = module, model, optimizer
        self.dp_rank, self.dp_size, self.tp = dp_rank, dp_size, tp
        # TP: name -> (view, shard dim, unpadded size), the TP-local 2-D shapes, and the replicated
        # parameters with partial grads; read (tp_info) before FSDP2 replaces the parameters
        info = tp_info or (tpmod.tp_info(module) if tp > 1 else {"specs": {}, "shapes": {}, "partial": set()})
        self.tp_specs, self.tp_shapes, self.tp_partial = info["specs"], info["shapes"], info["partial"]

    # ------------------------------------------------------------------ step
    def micro_context(self, last: bool):
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, grad_accum: int, last: bool) -> None:
        (loss / grad_accum).backward()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        n = torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], max_norm)
        return n.full_tensor() if hasattr(n, "full_tensor") else n

    def _tp_clip_grad_norm(self, max_norm: float, fsdp: bool) -> torch.Tensor:
        """TP (x DDP | x FSDP2): sum partial grads over TP, then the global norm counting every
        element once (tpmod.tp_grad_norm_sq) and the same scaling as clip_grad_norm_."""
        named = [(n, p) for n, p in self.module.named_parameters() if p.requires_grad and p.grad is not None]
        tpmod.sync_partial_grads(named, self.tp_partial)
        norm = tpmod.tp_grad_norm_sq(named, self.tp_specs, fsdp).sqrt()
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        for _, p in named:
            _local(p.grad).detach().mul_(coef.to(p.grad.dtype))
        return norm

    def step(self) -> None:
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard_gradients(self) -> None:
        """Drop this step's gradients without updating (a non-finite step is skipped)."""
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm_after_step(self) -> float:
        return float("nan")

    def all_reduce_dp(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (TP ranks of a replica hold equal values), in place."""
        if dist.is_initialized() and self.dp_size > 1:
            dist.all_reduce(t, group=tpmod.dp_group() if self.tp > 1 else None)
        return t

    def update_statistics(self) -> None:
        """After each optimizer step: modules keeping running statistics of the data (the Text
        VAE's latent shift/scale) update them from the whole step, summed over DP ranks."""
        for m in self.module.modules():
            if hasattr(m, "update_statistics"):
                m.update_statistics(self.all_reduce_dp)

    @property
    def optimizer_name(self) -> str:
        """The optimizer that steps, e.g. AdamW(fused), DeepSpeedCPUAdam (ZeRO wraps it)."""
        opt = getattr(self.optimizer, "optimizer", self.optimizer)
        kind = next((k for k in ("fused", "foreach") if getattr(opt, "defaults", {}).get(k)), "")
        return type(opt).__name__ + (f"({kind})" if kind else "")

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
    """A TP-local weight as a shard (its unpadded rows) of a DTensor of the canonical view."""
    from torch.distributed.tensor import DTensor, Shard
    view, dim, real = spec
    tp = mesh.size()
    _, n = tpmod.real_range(spec, tp, mesh.get_local_rank())
    gview = list(view)
    gview[dim] = real
    stride, acc = [], 1
    for s in reversed(gview):
        stride.insert(0, acc)
        acc *= s
    local = t.reshape(tpmod.local_view(spec, tp)).narrow(dim, 0, n)
    return DTensor.from_local(local, mesh, [Shard(dim)], run_check=False, shape=torch.Size(gview),
                              stride=tuple(stride))


def _from_dtensor(v, spec: tuple, shape, tp: int):
    """Inverse of _to_dtensor: the TP-local weight (padding rows zero) in the parameter's shape."""
    if not hasattr(v, "to_local"):
        return v
    loc = v.to_local()
    dim = spec[1]
    out = loc.new_zeros(tpmod.local_view(spec, tp))
    out.narrow(dim, 0, loc.shape[dim]).copy_(loc)
    return out.reshape(shape)


def _tp_wrap(state: dict, specs: dict, mesh) -> dict:
    """Model / optimizer state dicts with TP shards as DTensors of the canonical view."""
    msd, osd = state["model"], state["optim"]
    msd = {k: _to_dtensor(v, specs[k], mesh) if k in specs else v for k, v in msd.items()}
    ost = {}
    for fqn, st in osd["state"].items():
        ost[fqn] = {k: _to_dtensor(v, specs[fqn], mesh) if fqn in specs and torch.is_tensor(v) and v.dim() > 0 else v
                    for k, v in st.items()}
    return {"model": msd, "optim": {**osd, "state": ost}}


def _tp_unwrap(state: dict, specs: dict, shapes: dict, tp: int) -> dict:
    def un(v, k):
        return _from_dtensor(v, specs[k], shapes[k], tp) if k in specs else v
    msd = {k: un(v, k) for k, v in state["model"].items()}
    ost = {fqn: {k: un(v, fqn) for k, v in st.items()} for fqn, st in state["optim"]["state"].items()}
    return {"model": msd, "optim": {**state["optim"], "state": ost}}


class DCPMixin:
    """DCP checkpoints. With TP, each TP shard is stored as its piece of a DTensor of the
    weight's canonical view over the TP group. Under FSDP2 x TP the model / optimizer state is
    first gathered over the data-parallel group (full_state_dict: every rank holds its TP
    rank's whole shard), so the DTensors are 1-D over TP; the DP replicas write the same
    pieces, which DCP deduplicates. Loading reads the same layout and re-shards over DP."""
    ckpt_format = "dcp"

    def _sd_options(self):
        from torch.distributed.checkpoint.state_dict import StateDictOptions
        if self.strategy == "fsdp2" and self.tp > 1:
            return StateDictOptions(full_state_dict=True, cpu_offload=False)
        return None

    def _state(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict
        msd, osd = get_state_dict(self.module, self.optimizer, options=self._sd_options())
        state = {"model": msd, "optim": osd}
        if self.tp > 1:
            state = _tp_wrap(state, self.tp_specs, _tp_mesh(self.device_type))
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
            state = _tp_unwrap(state, self.tp_specs, self.tp_shapes, self.tp)
        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                       options=self._sd_options())


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
        return self._tp_clip_grad_norm(max_norm, fsdp=False)

    def save(self, tmp: Path, rank: int) -> None:
        (DCPMixin.save if self.tp > 1 else Engine.save)(self, tmp, rank)

    def load(self, path: Path, meta: dict) -> None:
        (DCPMixin.load if self.tp > 1 else Engine.load)(self, path, meta)

    _state = DCPMixin._state
    _sd_options = DCPMixin._sd_options

    def full_state_dict(self) -> dict | None:
        if self.tp == 1:
            return super().full_state_dict()
        return _gather_tp(self.module.state_dict(), self.tp_specs)


class FSDPEngine(DCPMixin, Engine):
    strategy = "fsdp2"

    def __init__(self, *a, device_type: str = "cpu", **kw):
        super().__init__(*a, **kw)
        self.device_type = device_type

    def micro_context(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor | None:
        if self.tp == 1:
            return super().clip_grad_norm(max_norm)
        return self._tp_clip_grad_norm(max_norm, fsdp=True)

    def full_state_dict(self) -> dict | None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        # with TP every rank gathers its TP shard over DP, then TP shards are gathered over TP
        sd = get_model_state_dict(self.module, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=self.tp == 1))
        if self.tp > 1:
            return _gather_tp(sd, self.tp_specs)
        return sd if dist.get_rank() == 0 else None


def _gather_tp(sd: dict, specs: dict) -> dict | None:
    """Collective over the TP group: unsharded weights (rank 0; None elsewhere) from a state
    dict holding each TP rank's whole shard."""
    out = {}
    for k, v in sd.items():
        if k.endswith("._extra_state"):
            continue
        if k in specs:
            v = tpmod.gather_full(v, specs[k], tpmod.tp_group())
        out[k] = v.detach().cpu().clone()
    return out if dist.get_rank() == 0 else None


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

    def discard_gradients(self) -> None:
        pass  # the trainer stops: DeepSpeed has no update-free step outside fp16 loss scaling

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
