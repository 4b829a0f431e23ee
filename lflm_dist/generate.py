"""Load a trained run and generate text with its family's sampler."""
from __future__ import annotations

from pathlib import Path

import torch

from lflm_dist.config import Config, SampleConfig, load_config
from lflm_dist.data.tokenizer import Tokenizer
from lflm_dist.models.registry import build_model
from lflm_dist.train.checkpoint import load_model_weights, resolve_checkpoint


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, Config, Tokenizer]:
    """Model (weights of the latest checkpoint, eval mode), resolved config and tokenizer of a run dir."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.yaml"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{cfg_path} not found: --run must be a run dir written by launchers/pretrain.py")
    cfg = load_config(cfg_path)
    tok = Tokenizer.load(run_dir / "tokenizer.json")
    model = build_model(cfg.model, init_pretrained=False)
    load_model_weights(model, resolve_checkpoint(run_dir))
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
