#!/usr/bin/env python
"""Consolidate any training checkpoint (DDP safetensors, FSDP2 / TP DCP, DeepSpeed ZeRO 1-3)
into plain safetensors loadable without the training stack:

    python launchers/export.py --run runs/cola_tiny --out exports/cola_tiny [--checkpoint DIR]

writes one safetensors file per part the model family names (`export_parts()`: Cola's
vae.safetensors + dit.safetensors, without the frozen reference encoder; model.safetensors for
the others), config.yaml and tokenizer.json. Load it with
`lflm_dist.generate.load_exported(dir)` (or `load_run`, which accepts both). One process,
no process group, CPU only."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lflm_dist.config import load_config, save_config  # noqa: E402
from lflm_dist.train.checkpoint import load_state_into, read_model_state, resolve_checkpoint  # noqa: E402


def export(run: Path, out: Path, checkpoint: Path | None = None) -> Path:
    from safetensors.torch import save_file
    from lflm_dist.models.registry import build_model
    cfg = load_config(run / "config.yaml")
    ck = resolve_checkpoint(checkpoint or run)
    model = build_model(cfg.model, init_pretrained=False)
    load_state_into(model, read_model_state(ck), f"checkpoint {ck}")  # reshapes TP views, checks every key
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": str(ck), "family": cfg.model.family}
    for part, prefix in model.export_parts().items():
        save_file({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}, out / f"{part}.safetensors",
                  metadata=meta)
    for section in (getattr(cfg.model, s) for s in vars(cfg.model)):
        if hasattr(section, "ref_checkpoint"):
            section.ref_checkpoint = ""  # the export is self-contained: no pretrained weights to load
    save_config(cfg, out / "config.yaml")
    shutil.copyfile(run / "tokenizer.json", out / "tokenizer.json")
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, type=Path, help="run dir (config.yaml, tokenizer.json, checkpoints/)")
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--checkpoint", type=Path, default=None, help="a checkpoints/step_* dir (default: latest)")
    a = ap.parse_args()
    try:
        print(f"exported {resolve_checkpoint(a.checkpoint or a.run)} -> {export(a.run, a.out, a.checkpoint)}")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
