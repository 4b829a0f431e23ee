#!/usr/bin/env python
"""Consolidate any training checkpoint (DDP safetensors, FSDP2 / TP DCP, DeepSpeed ZeRO 1-3)
into plain safetensors loadable without the training stack:

    python launchers/export.py --run runs/cola_tiny --out exports/cola_tiny [--checkpoint DIR]

writes one safetensors file per part the model family names (`export_parts()`: Cola's
vae.safetensors + dit.safetensors, without the frozen reference encoder; model.safetensors for
the others), config.yaml and tokenizer.json. Load it with
`lflm_dist.generate.load_exported(dir)` (or `load_run`, which accepts both). One process,
no process group, CPU only.

    python launchers/export.py --run runs/a --average runs/b runs/c --out exports/soup

exports the uniform average of the weights of several checkpoints of one model (a "model soup",
Wortsman et al. 2022: runs fine-tuned from one start lie in one basin, and their mean often
generalises better than each; an LFT flow layer: docs/lft.md). Any checkpoint formats; the
models must have the same parameters (names and shapes); config and tokenizer are --run's."""
from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lflm_dist.config import load_config, save_config  # noqa: E402
from lflm_dist.train.checkpoint import load_state_into, read_model_state, resolve_checkpoint  # noqa: E402


def model_state(cfg, ck: Path) -> tuple[dict, torch.nn.Module]:
    """The plain model's state with a checkpoint of any format loaded (TP views reshaped, every key checked)."""
    from lflm_dist.models.registry import build_model
    model = build_model(cfg.model, init_pretrained=False)
    load_state_into(model, read_model_state(ck), f"checkpoint {ck}")
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, model


def averaged(states: list[dict]) -> dict:
    """The uniform mean of states of one model (floating tensors accumulated in float64)."""
    out = {}
    for k, v in states[0].items():
        if all(torch.equal(v, s[k]) for s in states[1:]):
            out[k] = v  # e.g. a frozen teacher: kept bit-exact
        elif v.is_floating_point():
            out[k] = (sum(s[k].double() for s in states) / len(states)).to(v.dtype)
        else:
            raise ValueError(f"--average: the integer tensor {k} differs between the checkpoints")
    return out


def export(run: Path, out: Path, checkpoint: Path | None = None, average: list[Path] = ()) -> Path:
    from safetensors.torch import save_file
    cfg = load_config(run / "config.yaml")
    ck = resolve_checkpoint(checkpoint or run)
    state, model = model_state(cfg, ck)
    sources = [ck] + [resolve_checkpoint(a) for a in average]
    if average:
        # each loaded into the --run's model: a checkpoint of another model fails, naming its keys
        state = averaged([state] + [model_state(cfg, c)[0] for c in sources[1:]])
    out.mkdir(parents=True, exist_ok=True)
    meta = {"source": ", ".join(map(str, sources)), "family": cfg.model.family}
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
    ap.add_argument("--average", type=Path, nargs="+", default=[], metavar="RUN",
                    help="more run dirs (their latest checkpoint) or checkpoint dirs of the same model: export "
                         "the uniform average of all the weights")
    a = ap.parse_args()
    try:
        print(f"exported {resolve_checkpoint(a.checkpoint or a.run)}"
              f"{f' averaged with {len(a.average)} more' if a.average else ''} -> "
              f"{export(a.run, a.out, a.checkpoint, a.average)}")
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
