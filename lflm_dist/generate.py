"""Load a trained run and generate text with its family's sampler."""
from __future__ import annotations

from pathlib import Path

import torch

from lflm_dist.config import Config, SampleConfig, load_config
from lflm_dist.data.tokenizer import Tokenizer
from lflm_dist.models.registry import build_model
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
    return (p / "config.yaml").is_file() and any((p / f).is_file() for f in ("vae.safetensors", "model.safetensors"))


def load_exported(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, Tokenizer]:
    """Model (eval mode), config and tokenizer of an exported dir: needs only safetensors,
    the model code and the tokenizer, no training stack."""
    from safetensors.torch import load_file
    p = Path(path)
    cfg = load_config(p / "config.yaml")
    tok = Tokenizer.load(p / "tokenizer.json")
    model = build_model(cfg.model, init_pretrained=False)
    if (p / "model.safetensors").is_file():
        state = load_file(str(p / "model.safetensors"))
    else:
        state = {f"{part}.{k}": v for part in ("vae", "dit") if (p / f"{part}.safetensors").is_file()
                 for k, v in load_file(str(p / f"{part}.safetensors")).items()}
    # the frozen stage-2 reference encoder is not exported: keep the freshly built one
    state = {**{k: v for k, v in model.state_dict().items() if k.startswith("ref_encoder.")}, **state}
    load_state_into(model, state, f"exported dir {p} (weights vs its config.yaml)")
    return model.to(device).eval(), cfg, tok


def can_sample(model) -> bool:
    return getattr(model, "dit", True) is not None


def generate_text(model, tok: Tokenizer, prompts: list[str], scfg: SampleConfig, seed: int = 0) -> list[str]:
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ids = model.sample([tok.encode(p) for p in prompts], scfg.max_new_tokens, steps=scfg.steps,
                       guidance=scfg.guidance, temperature=scfg.temperature, top_k=scfg.top_k, top_p=scfg.top_p,
                       pad_id=tok.eos_id, generator=g)
    return [tok.decode(x) for x in ids]


def reconstruct_text(model, tok: Tokenizer, batch: torch.Tensor) -> list[tuple[str, str]]:
    """(original, reconstruction) pairs for a Cola VAE: what stage 1 can show."""
    rec = model.reconstruct(batch.to(next(model.parameters()).device))
    return [(tok.decode(a.tolist()), tok.decode(b.tolist())) for a, b in zip(batch, rec)]
