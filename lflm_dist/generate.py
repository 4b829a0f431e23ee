"""Load a trained run and generate text with its family's sampler."""
from __future__ import annotations

from pathlib import Path

import torch

from lflm_dist.config import Config, SampleConfig, load_config
from lflm_dist.data.tokenizer import Tokenizer
from lflm_dist.models.registry import build_model, load_named_weights
from lflm_dist.train.checkpoint import load_model_weights, load_state_into, resolve_checkpoint


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, Tokenizer]:
    """Model (weights of the latest checkpoint, eval mode), resolved config and tokenizer of a run dir."""
    run_dir = Path(run_dir)
    if is_exported(run_dir):
        return load_exported(run_dir, device)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: --run must be a run dir written by launchers/pretrain.py")
    cfg = load_config(cfg_path)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    model = build_model(cfg.model, init_pretrained=False)
    load_model_weights(model, resolve_checkpoint(run_dir))
    return model.to(device).eval(), cfg, tok


def is_exported(path: str | Path) -> bool:
    """A dir written by launchers/export.py (plain safetensors, no checkpoints/)."""
    p = Path(path)
    return (p / "config.yaml").is_file() and not (p / "checkpoints").is_dir() and any(p.glob("*.safetensors"))


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, Tokenizer]:
    """Model (eval mode), config and tokenizer of an exported dir: needs only safetensors,
    the model code and the tokenizer, no training stack."""
    from safetensors.torch import load_file
    p = Path(path)
    cfg = load_config(p / "config.yaml")
    tok = Tokenizer.load(p / "tokenizer.json")
    model = build_model(cfg.model, init_pretrained=False)
    parts = model.export_parts()
    missing = [f"{part}.safetensors" for part in parts if not (p / f"{part}.safetensors").is_file()]
    if missing:
        raise FileNotFoundError(f"exported dir {p} lacks {missing}: export it again with launchers/export.py")
    state = {prefix + k: v for part, prefix in parts.items() for k, v in load_file(str(p / f"{part}.safetensors")).items()}
    # what no part holds is not exported: it comes from the weights the model names (LFT's teacher,
    # from model.lft.teacher), or, where it names none, stays as built (Cola's stage-2 reference encoder)
    rest = {k: v for k, v in model.state_dict().items() if not any(k.startswith(x) for x in parts.values())}
    if rest and load_named_weights(model):
        rest = {k: v for k, v in model.state_dict().items() if k in rest}
    state = {**rest, **state}
    load_state_into(model, state, f"exported dir {p} (weights vs its config.yaml)")
    return model.to(device).eval(), cfg, tok


def can_sample(model) -> bool:
    return model.sampling_unavailable() is None


def generate_text(model, tok: Tokenizer, prompts: list[str], scfg: SampleConfig, seed: int = 0) -> list[str]:
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ids = model.sample([tok.encode(p) for p in prompts], scfg.max_new_tokens, **scfg.sampler_kwargs(),
                       pad_id=tok.eos_id, generator=g)
    return [tok.decode(x) for x in ids]


def reconstruct_text(model, tok: Tokenizer, batch: torch.Tensor) -> list[tuple[str, str]]:
    """(original, reconstruction) pairs of a latent family: what a model that cannot sample shows."""
    rec = model.reconstruct(batch.to(next(model.parameters()).device))
    return [(tok.decode(a.tolist()), tok.decode(b.tolist())) for a, b in zip(batch, rec)]
