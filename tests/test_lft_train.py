"""The Latent Flow Transformer through the shared stack: `launchers/pretrain.py --config
configs/lft_smollm2.yaml` with a tiny random Llama teacher trains the flow layer only (the teacher's
weights never move), resumes bit-identically after an interruption, 2 processes under DDP, FSDP2
and ZeRO-2 give one process's losses (and resume), and the run evaluates (exact NLL), generates,
compares against skip baselines and exports."""
import json
import os
import subprocess
import sys

import pytest
import torch

from test_lft import save_tiny_teacher
from test_train import (FAMILY_CASES as CASES, FAMILY_STEPS as STEPS, ROOT, cut_and_resume, first_half_then_resume,
                        launch as launch_run, losses)

CONFIG = "configs/lft_smollm2.yaml"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("lft_teacher") / "llama")


def base(teacher):
    return [f"model.lft.teacher={teacher}", "model.seq_len=32", "model.lft.block_start=1", "model.lft.block_end=4",
            "model.lft.pair_cache_gb=0", "train.global_batch_size=8", "train.warmup_steps=2", "train.eval_batches=2",
            "train.lr=3e-3", "run.wandb_mode=disabled", "sample.num_samples=1", "sample.max_new_tokens=6",
            "data.num_workers=1"]


def launch(teacher, data, run_dir, *extra, nproc=1, expect=0):
    return launch_run(data, run_dir, *extra, nproc=nproc, expect=expect, config=CONFIG, base=base(teacher))


@pytest.fixture(scope="module")
def reference(teacher, tiny_data, tmp_path_factory):
    run = tmp_path_factory.mktemp("lft") / "one"
    p = launch(teacher, tiny_data, run, *STEPS)
    assert "[train] lft teacher=llama layers[1,4) -> flow layer" in p.stdout and "--- sample 0" in p.stdout
    return run


def test_lft_trains_the_flow_layer_only_and_its_loss_falls(reference, teacher):
    from safetensors.torch import load_file
    ls = losses(reference)
    assert len(ls) == 4 and min(ls[2:]) < ls[0]
    ck = load_file(str(reference / "checkpoints" / "step_00000004" / "model.safetensors"))
    src = load_file(str(teacher / "model.safetensors"))
    for k, v in src.items():  # the teacher as loaded (its tied head included) and never updated
        assert torch.equal(ck[f"teacher.{k}"], v), k
    assert torch.equal(ck["teacher.lm_head.weight"], src["model.embed_tokens.weight"])
    assert not torch.equal(ck["flow.field.layer.mlp.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"])


def test_lft_flow_layer_starts_from_init_from(reference, teacher):
    """model.lft.init_from: the flow layer of another run (Flow Walking from a flow-matching run,
    here on a longer block), the teacher still from lft.teacher."""
    from safetensors.torch import load_file
    from lflm_dist.config import load_config
    from lflm_dist.models.registry import build_model
    cfg = load_config(ROOT / CONFIG, [*base(teacher), "model.lft.block_end=5", f"model.lft.init_from={reference}",
                                      "model.lft.objective=flow_walking"])
    cfg.model.vocab_size = json.loads((teacher / "config.json").read_text())["vocab_size"]
    state = build_model(cfg.model).state_dict()
    ck = load_file(str(reference / "checkpoints" / "step_00000004" / "model.safetensors"))
    flow = [k for k in state if k.startswith("flow.")]
    assert flow and all(torch.equal(state[k], ck[k]) for k in flow)
    src = load_file(str(teacher / "model.safetensors"))
    assert torch.equal(state["teacher.model.layers.1.mlp.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"])
    assert not torch.equal(state["flow.field.layer.mlp.down_proj.weight"], src["model.layers.1.mlp.down_proj.weight"])


def test_lft_resume_is_bit_identical(teacher, tiny_data, tmp_path):
    full, cut = cut_and_resume(CONFIG, [*base(teacher), "train.max_steps=5", "train.ckpt_every=2"], tiny_data, tmp_path)
    assert len(losses(full)) == 5 and losses(cut) == losses(full)


@pytest.mark.parametrize("name", list(CASES))
def test_lft_strategy_matches_one_process_and_resumes(name, reference, teacher, tiny_data, tmp_path):
    """DDP, FSDP2 (the velocity field its unit, the frozen teacher sharded at the root) and ZeRO-2."""
    run = tmp_path / name
    first_half_then_resume(lambda *a, **k: launch(teacher, *a, **k), tiny_data, run, name)
    assert losses(run) == pytest.approx(losses(reference), rel=1e-5)


def test_lft_run_evaluates_compares_and_exports(reference, tmp_path):
    from lflm_dist.eval.likelihood import BoundSettings, evaluate_likelihood, load_eval_text
    from lflm_dist.generate import load_run
    model, cfg, tok = load_run(reference)
    data = load_eval_text(ROOT / "README.md", tok, max_chars=400)
    r = evaluate_likelihood(model, cfg, tok, data, settings=BoundSettings())
    assert r["family"] == "lft" and r["kind"] == "exact" and r["what"] == "exact" and r["bpc"] > 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    text = tmp_path / "text.txt"
    text.write_text((ROOT / "README.md").read_text()[:4000])
    out = tmp_path / "cmp.json"
    p = subprocess.run([sys.executable, str(ROOT / "launchers/lft.py"), "compare", "--run", str(reference),
                        "--text", str(text), "--windows", "3", "--window", "32", "--steps", "1,2", "--out", str(out),
                        "--plot", str(tmp_path / "kl.png")],
                       capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"] for r in rows] == ["teacher", "skip [1,2)", "skip [1,3)", "skip [1,4)",
                                          "flow [1,4) k=1", "flow [1,4) k=2"]
    assert rows[0]["kl"] == pytest.approx(0, abs=1e-6) and all(r["kl"] > 0 for r in rows[1:])
    assert (tmp_path / "kl.png").stat().st_size > 0

    def later_rows(text_file, *args):  # --from-char: the text from that character on
        p = subprocess.run([sys.executable, str(ROOT / "launchers/lft.py"), "compare", "--run", str(reference),
                            "--text", str(text_file), "--windows", "2", "--window", "32", "--steps", "1",
                            "--skips", "1", "--out", str(out), *args], capture_output=True, text=True, cwd=ROOT,
                           timeout=300, env=env)
        assert p.returncode == 0, p.stderr[-2000:]
        return [r["kl"] for r in json.loads(out.read_text())["rows"]]
    tail = tmp_path / "tail.txt"
    tail.write_text(text.read_text()[2000:])
    assert later_rows(text, "--from-char", "2000") == later_rows(tail) != [r["kl"] for r in rows[:2] + rows[4:5]]

    sys.path.insert(0, str(ROOT / "launchers"))
    from export import export
    exported_dir = export(reference, tmp_path / "export")
    assert sorted(f.name for f in exported_dir.glob("*.safetensors")) == ["flow.safetensors"]  # no teacher copy
    exported, _, _ = load_run(exported_dir)
    x = torch.tensor([data.docs[0][:32]])
    torch.testing.assert_close(exported.nll_bound(x).nll, model.nll_bound(x).nll)
