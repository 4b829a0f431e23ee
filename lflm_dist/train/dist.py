"""Process-group set-up from the torchrun / deepspeed / SLURM environment."""
from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(backend: str = "auto", force: bool = False) -> DistInfo:
    """Initialise torch.distributed when launched with more than one process (torchrun sets
    RANK/WORLD_SIZE/LOCAL_RANK); one process runs without a process group unless `force`
    (FSDP2 / DeepSpeed / TP need one even alone: a 1-process group on a free local port)."""
    _from_slurm()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    # modulo: where SLURM binds one GPU per task (--gpus-per-task=1), each task sees only its own as cuda:0
    device = torch.device("cuda", local % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if force and world == 1 and not dist.is_initialized() and "MASTER_ADDR" not in os.environ:
        import socket
        with socket.socket() as sk:
            sk.bind(("127.0.0.1", 0))
            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(sk.getsockname()[1]), RANK="0",
                              WORLD_SIZE="1", LOCAL_RANK="0")
    if (world > 1 or force) and not dist.is_initialized():
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        dist.init_process_group(backend=backend, device_id=device if cuda else None)
    return DistInfo(rank, world, local, device)


def _from_slurm() -> None:
    """Under `srun` (one task per process, no torchrun), map SLURM's variables onto the
    torch.distributed ones; torchrun/deepspeed-set variables win."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) < 2:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    # every task must name the same rendezvous host: the allocation's first node (slurm/*.sh export
    # it; this is the fallback for a bare srun). SLURM_LAUNCH_NODE_IPADDR is wrong for an srun
    # started from a login node, and differs between tasks on no node.
    os.environ.setdefault("MASTER_ADDR", first_slurm_host() or "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + int(os.environ.get("SLURM_JOB_ID", "0")) % 1000))


def first_slurm_host(nodelist: str | None = None) -> str | None:
    """First host of SLURM_JOB_NODELIST: `scontrol show hostnames` when it is on PATH, else
    the first name of the compressed list (`gpu[003-010,12],cpu1` -> gpu003)."""
    nodelist = nodelist if nodelist is not None else os.environ.get("SLURM_JOB_NODELIST", "")
    if not nodelist:
        return None
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                             timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.TimeoutExpired):
        pass
    m = re.match(r"([^,\[]+)(?:\[([^,\]-]+))?", nodelist)
    return m.group(1) + (m.group(2) or "") if m else None


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
