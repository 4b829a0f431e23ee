"""Config loading: YAML + dotted overrides, errors that name the key."""
from pathlib import Path

import pytest

from lflm_dist.config import ConfigError, load_config


def test_shipped_configs_load():
    for name in ("cola_tiny_vae", "cola_tiny", "ar_tiny"):
        cfg = load_config(f"configs/{name}.yaml")
        assert cfg.run.dir == f"runs/{name}"


def test_dotted_overrides_are_typed():
    cfg = load_config("configs/cola_tiny.yaml", ["train.max_steps=7", "train.lr=1e-3", "model.vae.beta=0",
                                                 "run.dir=/tmp/x"])
    assert cfg.train.max_steps == 7 and cfg.train.lr == 1e-3 and cfg.model.vae.beta == 0.0
    assert isinstance(cfg.model.vae.beta, float) and cfg.run.dir == "/tmp/x"


@pytest.mark.parametrize("override,needle", [
    ("train.max_step=5", "train.max_step"),           # typo: unknown key, with a suggestion
    ("train.max_steps=five", "train.max_steps"),      # wrong type
    ("model.vae.latent_dim=1.5", "model.vae.latent_dim"),
    ("parallel.strategy=zero9", "parallel.strategy"),
    ("model.seq_len=30", "model.seq_len"),            # not a multiple of the block size
    ("train.global_batch_size=0", "train.global_batch_size"),
    ("model.dit.block_size=6", "model.dit.block_size"),
    ("trainn.seed=1", "trainn"),
    ("sample.churn=1.5", "sample.churn"),             # outside [0, 1]
])
def test_errors_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config("configs/cola_tiny.yaml", [override])
    assert needle in str(e.value)


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match="did you mean train.max_steps"):
        load_config(None, ["train.max_step=5"])


def test_yaml_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("train:\n  nope: 1\n")
    with pytest.raises(ConfigError, match="train.nope"):
        load_config(bad)


def test_unknown_family_lists_the_registered_ones():
    with pytest.raises(ConfigError, match=r"model.family='lflm2' is not a registered model family; registered: "
                                          r"ar, cola, lflm"):
        load_config(None, ["model.family=lflm2"])


def test_each_family_checks_only_its_own_section():
    """Cola's block-size rules do not bind AR or LFLM, and each family's own checks name its keys."""
    load_config(None, ["model.family=ar", "model.seq_len=30"])  # not a multiple of Cola's blocks
    with pytest.raises(ConfigError, match="model.seq_len \\(30\\) must be a multiple of model.vae.block_size"):
        load_config(None, ["model.family=cola", "model.seq_len=30"])
    with pytest.raises(ConfigError, match="model.lflm.beta_schedule"):
        load_config(None, ["model.family=lflm", "model.lflm.beta_schedule=sigmoid"])


@pytest.mark.parametrize("path", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")))
def test_every_shipped_config_loads_and_builds(path, tmp_path):
    """configs/*.yaml stay true to the code: they load and their model builds (on the meta device).
    LFT configs name a teacher dir made by a data tool: where it is absent, one with SmolLM2-135M's
    config.json (the shape is all a meta build reads) stands in."""
    from lflm_dist.models.registry import build_model
    root = Path(__file__).resolve().parents[1]
    extra = []
    if path.startswith("lft") and not (root / "data" / "smollm2-135m" / "config.json").is_file():
        import transformers
        transformers.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                                 tie_word_embeddings=True).save_pretrained(tmp_path)
        extra = [f"model.lft.teacher={tmp_path}"]
    cfg = load_config(root / "configs" / path, ["model.vocab_size=512", *extra])
    assert build_model(cfg.model, device="meta").flops_per_token() > 0
