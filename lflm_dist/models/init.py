"""Weight initialisation and pretrained loading that do not depend on how a model is sharded.

Models are built on the meta device (no memory), sharded by `lflm_dist.parallel` while still
abstract, then materialised here, each rank allocating and filling only its own shard
(torchtitan's pattern). PyTorch's default init draws from one global RNG stream, so a shard
cannot reproduce its piece of it; here every parameter has its own generator, seeded by
(seed, parameter name), and the full value is drawn on the CPU one parameter at a time and
only the local shard kept. Every strategy and world size therefore starts from the same
weights (the parity tests rely on it), and no rank ever holds more than the largest single
parameter in full.

The distributions are PyTorch's defaults: nn.Linear weight and bias U(±1/sqrt(fan_in)),
nn.Embedding N(0, 1), RMSNorm gain 1, nn.LSTM weights and biases U(±1/sqrt(hidden_size));
modules marked by `zero_init` (adaLN-Zero) start at 0, and so do those marked
`loaded_from_pretrained` (LFT's teacher, filled next by `registry.load_named_weights`); a module
with an `init_param(name, shape, generator)` method draws its own parameters (TarFlowLM's Gaussian codebook).
Buffers are reset by their module's `reset_buffers()`.
"""
from __future__ import annotations

import math
import zlib
from pathlib import Path

import torch
import torch.nn as nn


def zero_init(linear: nn.Linear) -> nn.Linear:
    """Mark (and, when not on the meta device, set) a linear layer to start at zero."""
    linear.zero_init = True
    if not linear.weight.is_meta:
        nn.init.zeros_(linear.weight)
        if linear.bias is not None:
            nn.init.zeros_(linear.bias)
    return linear


def _generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63))


def init_value(module: nn.Module, pname: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """The full initial value of `module`'s own parameter `pname` (fp32, CPU whatever the
    ambient default device)."""
    cpu = torch.device("cpu")
    if getattr(module, "zero_init", False) or getattr(module, "loaded_from_pretrained", False):
        return torch.zeros(shape, device=cpu)  # (the latter: overwritten by the model's pretrained weights)
    if hasattr(module, "init_param"):  # a module's own rule for its own parameters (TarFlowLM's codebook)
        return module.init_param(pname.rsplit(".", 1)[-1], shape, gen).to(cpu)
    if isinstance(module, nn.Linear):
        bound = 1.0 / math.sqrt(module.in_features)
        return torch.empty(shape, device=cpu).uniform_(-bound, bound, generator=gen)
    if isinstance(module, nn.Embedding):
        return torch.empty(shape, device=cpu).normal_(0.0, 1.0, generator=gen)
    if type(module).__name__ == "RMSNorm":
        return torch.ones(shape, device=cpu)
    if isinstance(module, nn.RNNBase):  # nn.LSTM/GRU/RNN weights and biases: U(±1/sqrt(hidden_size))
        bound = 1.0 / math.sqrt(module.hidden_size)
        return torch.empty(shape, device=cpu).uniform_(-bound, bound, generator=gen)
    raise TypeError(f"no initialisation rule for parameter {pname!r} of {type(module).__name__}: add one to "
                    "lflm_dist/models/init.py::init_value")


def local_part(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The piece of `full` that `like` (a DTensor shard, or a plain tensor) holds on this rank."""
    if not hasattr(like, "device_mesh"):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
    shape, offset = compute_local_shape_and_global_offset(full.shape, like.device_mesh, like.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape))]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _canonical(name: str, aliases: dict[str, str]) -> str:
    for prefix, target in aliases.items():
        if name.startswith(prefix):
            return target + name[len(prefix):]
    return name


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device | str, seed: int) -> nn.Module:
    """Allocate a meta (possibly FSDP2-sharded) model on `device` and initialise each rank's
    shard. `model.init_aliases` ({prefix: prefix}) lets copies start equal to their original
    (Cola's frozen reference encoder draws the values of vae.encoder)."""
    model.to_empty(device=device)
    aliases = getattr(model, "init_aliases", {})
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            name = f"{mname}.{pname}" if mname else pname
            full = init_value(module, name, p.shape, _generator(seed, _canonical(name, aliases)))
            _local(p).copy_(local_part(full, p))
        if hasattr(module, "reset_buffers"):
            module.reset_buffers()
    return model


# ----------------------------------------------------------------------------- pretrained weights
def load_pretrained(model: nn.Module, checkpoint: str | Path, prefixes: dict[str, str]) -> None:
    """Load weights from another run's checkpoint into `model` (plain or sharded): each entry of
    the model's state whose name starts with a key of `prefixes` takes the checkpoint tensor
    named with that prefix replaced (Cola: {"vae.": "vae.", "ref_encoder.": "vae.encoder."}).
    Each rank reads only its shard where the format allows it: DCP checkpoints through
    torch.distributed.checkpoint (resharded on load), safetensors by slicing the file lazily;
    DeepSpeed checkpoints are consolidated first."""
    from lflm_dist.train.checkpoint import checkpoint_format, read_model_state, resolve_checkpoint
    path = resolve_checkpoint(checkpoint)
    own = model.state_dict()
    wanted = {k: _canonical(k, prefixes) for k in own if any(k.startswith(p) for p in prefixes)
              and not k.endswith("._extra_state")}
    if not wanted:
        return
    fmt = checkpoint_format(path)
    if fmt == "dcp":
        values = _read_dcp(path, wanted, own)
    elif fmt == "safetensors":
        values = _read_safetensors(path / "model.safetensors", wanted, own)
    else:
        full = read_model_state(path)
        values = {k: full[src] for k, src in wanted.items() if src in full}
    missing = [src for k, src in wanted.items() if k not in values]
    if missing:
        raise RuntimeError(f"{path}: the pretrained weights lack {missing[:4]} (needed for "
                           f"{sorted(set(prefixes))}); they must come from a run with the same settings for "
                           "these modules (e.g. the same model.vae as the stage-1 run)")
    with torch.no_grad():
        for k, v in values.items():
            dst = own[k]
            if v.shape != _local(dst).shape:  # a full tensor for a shard, or a TP canonical view
                v = local_part(v.reshape(dst.shape), dst)
            _local(dst).copy_(v)


def _read_safetensors(file: Path, wanted: dict[str, str], own: dict) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    out = {}
    with safe_open(str(file), framework="pt") as f:
        have = set(f.keys())
        for k, src in wanted.items():
            if src not in have:
                continue
            sl, dst = f.get_slice(src), own[k]
            if hasattr(dst, "device_mesh") and list(sl.get_shape()) == list(dst.shape):
                from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
                shape, off = compute_local_shape_and_global_offset(dst.shape, dst.device_mesh, dst.placements)
                out[k] = sl[tuple(slice(o, o + s) for o, s in zip(off, shape))]
            else:
                out[k] = sl[:]
    return out


def _read_dcp(path: Path, wanted: dict[str, str], own: dict) -> dict[str, torch.Tensor]:
    """Tensors stored under the same global shape are loaded straight into this rank's shard
    (DCP reshards); others (TP canonical views) are read whole and reshaped by the caller."""
    import torch.distributed.checkpoint as dcp
    reader = dcp.FileSystemReader(str(path / "dcp"))
    meta = reader.read_metadata().state_dict_metadata
    direct, other = {}, {}
    for k, src in wanted.items():
        m = meta.get(f"model.{src}")
        if m is None:
            continue
        (direct if hasattr(m, "size") and tuple(m.size) == tuple(own[k].shape) else other)[k] = src
    out = {}
    # one DCP key may feed several model entries (an alias): load each source once, copy after
    by_src: dict[str, str] = {}
    for k, src in direct.items():
        by_src.setdefault(src, k)
    if by_src:
        targets = {f"model.{src}": torch.empty_like(own[k]) for src, k in by_src.items()}
        dcp.load(targets, storage_reader=reader)
        for k, src in direct.items():
            out[k] = _local(targets[f"model.{src}"])
    if other:
        from lflm_dist.train.checkpoint import read_model_state
        full = read_model_state(path)
        out.update({k: full[src] for k, src in other.items()})
    return out
