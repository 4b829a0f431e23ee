"""Typed run configuration: dataclasses loaded from YAML with dotted CLI overrides.

Every key is declared below; an unknown key or a value of the wrong type is a
`ConfigError` that names the dotted key and says what was expected, so a typo in a
sweep never silently falls back to a default.
"""
from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration problem, always naming the offending dotted key."""


# ----------------------------------------------------------------------------- sections
@dataclass
class RunConfig:
    dir: str = "runs/debug"
    name: str = ""  # wandb run name; defaults to the basename of dir
    wandb_project: str = "lflm_dist"
    wandb_mode: str = "offline"  # offline | online | disabled


@dataclass
class DataConfig:
    # directory holding tokenizer.json, train/ and valid/ shards; or the same layout remote: an http(s)://
    # URL prefix, or "pipe:CMD" with {path} in CMD (e.g. "pipe:aws s3 cp s3://b/data/{path} -"), read in
    # stream mode with retries (lflm_dist/data/remote.py)
    path: str = "data/shakespeare"
    # split names under data.path, or a split given as webdataset brace pattern of shard URLs or pipe
    # commands ("https://host/train/shard-{000000..000099}.tar"), manifest.json beside the shards
    train_split: str = "train"
    valid_split: str = "valid"
    num_workers: int = 2
    loader: str = "indexed"  # indexed (global sample order, world-size independent) | stream
    # a sample whose bytes fail the manifest's checksum, an unreadable or missing shard: error (stop, naming
    # the shard and sample) | skip (another sample takes its place; counted as skipped_samples)
    on_corrupt: str = "error"
    retries: int = 5  # remote reads: tries after the first, exponential back-off from retry_backoff_s (max 30 s)
    retry_backoff_s: float = 1.0


@dataclass
class TransformerConfig:
    """Shape of one transformer stack (VAE encoder/decoder, DiT, AR model)."""
    dim: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_mult: float = 4.0  # SwiGLU hidden = ffn_mult * dim (rounded to a multiple of 8)
    rope_theta: float = 10000.0
    qk_norm: bool = True
    dropout: float = 0.0


@dataclass
class VAEConfig:
    encoder: TransformerConfig = field(default_factory=TransformerConfig)
    decoder: TransformerConfig = field(default_factory=TransformerConfig)
    latent_dim: int = 16
    block_size: int = 4  # tokens per block: bidirectional inside, causal across
    beta: float = 1e-3  # weight of KL(q(z|x) || N(0, I))
    mask_prob: float = 0.0  # BERT-style masked-token loss; 0 disables it
    mask_weight: float = 0.1
    latent_stats_momentum: float = 0.99  # EMA of latent mean/std used to normalise for the prior
    # floor on the posterior std (latent units): var = min_std^2 + exp(logvar). Without one, stage 2's
    # small entropy weight lets the posterior narrow until the prior must resolve needle-thin modes
    min_std: float = 0.0


@dataclass
class DiTConfig:
    net: TransformerConfig = field(default_factory=lambda: TransformerConfig(dim=128, n_layers=2))
    block_size: int = 4  # latent positions per diffusion block
    t_loc: float = 1.0  # logit-normal timestep: t = sigmoid(t_loc + t_scale * N(0, 1))
    t_scale: float = 1.0
    # fraction of blocks whose t is drawn uniformly on (0, 1) instead: logit-normal(1, 1) alone almost
    # never trains small t (P(t < 0.1) ~ 7e-4), where the prior's density must resolve the posterior
    t_uniform_frac: float = 0.0
    # the Cola release's recipe: each sample trains at a block size drawn uniformly among the powers
    # of two up to block_size; and with prompt_in_block_prob a sample's blocks start with a clean part
    # (t = 0, not in the loss) of 1..size-1 positions, so generation continues a prompt of any length
    # inside its last block instead of padding it to a whole block. Either makes t per position.
    random_block_size: bool = False
    prompt_in_block_prob: float = 0.0
    cfg_drop_prob: float = 0.1  # probability of dropping the clean history (for guidance)
    # velocity of a per-token Gaussian mixture whose weights p(token | z_t, history) the network
    # predicts, trained with a token cross-entropy (model.cola.lambda_token_ce; dit.TokenMixtureHead)
    token_mixture: bool = False
    # the clean history's tokens embedded beside its latents: the prior is p(z_b | z_<b, x_<b). The
    # decoder reads z_<=b only, so p(x, z) = prod_b p(z_b | z_<b, x_<b) p(x_b | z_<=b) is still a
    # normalised joint and the -ELBO an upper bound; at sampling time the history's tokens are the
    # prompt's and the decoded blocks'. A 16-d latent names its token only through the network's
    # layers (docs/cola_ablation.md: the DiT's next-token CE stayed near the unigram's), an embedding
    # table names it at once, as the AR baseline's does.
    history_tokens: bool = False


@dataclass
class ColaConfig:
    stage: int = 1  # 1: VAE only; 2: joint VAE + DiT with a KL to a frozen reference encoder
    lambda_vae: float = 1.0
    lambda_fm: float = 1.0
    lambda_ref: float = 0.1
    # stage 2: weight of the token cross-entropy of the DiT's denoised estimate z0_hat = z_t - t v,
    # read by the VAE decoder (CDCD's score-interpolation idea): the MSE of flow matching barely
    # rewards using the history (docs/cola_ablation.md), a token CE does. 0 = off.
    lambda_denoised_ce: float = 0.0
    # stage 2 with dit.token_mixture: weight of the cross-entropy of the DiT's p(token | z_t, history)
    lambda_token_ce: float = 1.0
    ref_checkpoint: str = ""  # stage 2: run dir or checkpoint whose encoder is the reference
    # stage 2's latent normalisation (z - shift) * scale for the prior: stage1 (from ref_checkpoint,
    # frozen) | track (estimated during this run, as stage 1 does) | identity (shift 0, scale 1)
    latent_stats: str = "stage1"


@dataclass
class ARConfig:
    net: TransformerConfig = field(default_factory=TransformerConfig)


@dataclass
class LFLMConfig:
    """LFLM: BiLSTM + attention-pooling encoder -> z(0) ~ q(z0|x); neural ODE dz/dt = f(z, t) from
    t = 0 to 1; a non-autoregressive transformer decoder reads z(1) and emits every position at once."""
    embed_dim: int = 128
    encoder_hidden: int = 128  # LSTM hidden size per direction
    encoder_layers: int = 1
    latent_dim: int = 32
    ode_hidden: int = 128  # width of the MLP f_theta(z, t)
    ode_layers: int = 2  # hidden layers of f_theta
    ode_method: str = "rk4"  # torchdiffeq solver: rk4 | euler | midpoint (fixed step) | dopri5 (adaptive)
    ode_steps: int = 4  # steps of a fixed-step solver
    rtol: float = 1e-5  # adaptive solvers
    atol: float = 1e-5
    adjoint: bool = False  # torchdiffeq.odeint_adjoint: O(1) memory in the solver steps, one more solve in backward
    decoder: TransformerConfig = field(default_factory=TransformerConfig)
    latent_tokens: int = 4  # z(1) -> this many prefix tokens every position attends to (plus added to each position)
    beta: float = 1.0  # KL weight after annealing
    beta_schedule: str = "linear"  # constant | linear (0 -> beta over beta_steps) | cyclical (period beta_steps)
    beta_steps: int = 1000
    free_bits: float = 0.0  # nats per latent dim: KL of a dim below this (batch mean) is not penalised


@dataclass
class FlowBlockConfig:
    """One autoregressive flow block of TarFlowLM's prior (a causal transformer conditioner)."""
    coupling: str = "mix1"  # affine | mix1 (1-D Mixture-CDF per dim) | rosenblatt (first block only)
    n_layers: int = 2  # transformer layers of this block's conditioner
    components: int = 16  # mix1: mixture components per dimension (rosenblatt: the vocabulary, tied)


@dataclass
class TarFlowConfig:
    """TarFlowLM: a Gaussian codebook q(z|x=k) = N(mu_k, sigma_k^2 I) tied to the decoder, and a
    prior of stacked autoregressive flows (alternating direction) to N(0, I); exact ELBO."""
    latent_dim: int = 5  # d per token (paper: 5 for text8, 16 for OpenWebText)
    init_std: float = 0.5  # sigma_k at initialisation (means start N(0, 1))
    patch_size: int = 1  # K tokens per flow position (block-wise generation); rosenblatt needs 1
    dim: int = 128  # width of every block's conditioner transformer
    n_heads: int = 4
    ffn_mult: float = 4.0
    made_hidden: int = 0  # hidden units of the within-token MADE (0: dim)
    blocks: list[FlowBlockConfig] = field(default_factory=lambda: [
        FlowBlockConfig("rosenblatt", 2), FlowBlockConfig("mix1", 1), FlowBlockConfig("mix1", 1)])
    # progressive training: the codebook and the first frozen_blocks blocks load from init_from (a run
    # dir or checkpoint of the previous stage) and stay frozen while the later blocks train
    frozen_blocks: int = 0
    init_from: str = ""
    inverse_tol: float = 1e-5  # bisection tolerance of the mixture inverses (sampling)


@dataclass
class LFTConfig:
    """Latent Flow Transformer: a frozen pretrained causal LM (the teacher) whose decoder layers
    [block_start, block_end) are replaced by one flow-matching velocity layer run for `steps` steps."""
    teacher: str = ""  # local Hugging Face model dir (config.json + model.safetensors); fetch_reference_lm.py --hf-dir
    block_start: int = 12  # m: the first replaced layer; the flow maps its input x0 ...
    block_end: int = 19  # n: ... to the output x1 of layer n-1
    init_layer: int = -1  # teacher layer the velocity layer starts as (-1: block_start)
    objective: str = "flow_matching"  # flow_matching | flow_walking
    walk_steps: int = 3  # Flow Walking: k steps between k-1 random sorted times in (0, 1)
    walk_solver: str = "midpoint"  # euler | midpoint
    alpha_fm: float = 0.001  # Flow Walking: weight of the flow-matching regulariser
    # the NMSE's denominator: each sequence's update energy |x1 - x0|^2 (sequence), each token's
    # (token: every position weighs alike, not the first token's massive activation), or the mean
    # of the two losses (both); see models/lft.py
    loss_norm: str = "sequence"
    # weight of KL(teacher || student) of the next-token distributions at the student's x1 estimate
    # (the teacher's layers n.. and head run on it and on x1; see models/lft.py); 0: off
    kl_weight: float = 0.0
    kl_tokens: int = 64  # positions per sequence the KL scores (0: all; the head is vocabulary-wide)
    t0_frac: float = 0.0  # share of flow-matching samples at t = 0 (where a 1-step Euler student reads the field)
    steps: int = 1  # solver steps of the student (evaluation, generation)
    solver: str = "euler"  # euler | midpoint
    # keep each training sequence's teacher states (x0, x1) in host memory, up to this many GiB per
    # rank, so later epochs skip the teacher (0: recompute every step; exact resume needs 0)
    pair_cache_gb: float = 0.0
    # a run dir or checkpoint whose flow layer this one starts from instead of teacher layer
    # init_layer (e.g. Flow Walking from a flow-matching run on the same block)
    init_from: str = ""


@dataclass
class ModelConfig:
    family: str = "cola"  # a registered family: cola | ar | lflm | tarflow | lft (lflm_dist.models.registry)
    vocab_size: int = 0  # 0: taken from the tokenizer
    seq_len: int = 64
    # attention kernels: auto (SDPA is_causal for causal masks; FlexAttention with a BlockMask for
    # block-causal masks on CUDA, the dense mask on CPU) | flex | sdpa | dense (the reference)
    attention: str = "auto"
    vae: VAEConfig = field(default_factory=VAEConfig)
    dit: DiTConfig = field(default_factory=DiTConfig)
    cola: ColaConfig = field(default_factory=ColaConfig)
    ar: ARConfig = field(default_factory=ARConfig)
    lflm: LFLMConfig = field(default_factory=LFLMConfig)
    tarflow: TarFlowConfig = field(default_factory=TarFlowConfig)
    lft: LFTConfig = field(default_factory=LFTConfig)


@dataclass
class TrainConfig:
    max_steps: int = 100
    global_batch_size: int = 16  # sequences per optimizer step, summed over data-parallel ranks
    grad_accum: int = 1
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: list = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    seed: int = 0
    ckpt_every: int = 50
    keep_checkpoints: int = 2  # the newest ones kept (older ones deleted once a new one is complete)
    keep_every: int = 0  # also keep every checkpoint whose step is a multiple of this (0: none)
    # trainer.json records every checkpoint file's size, and with this its sha256 (rank 0 reads the whole
    # checkpoint once more, ~1 s per GB); resume refuses a checkpoint whose files do not match
    checkpoint_hashes: bool = True
    # seconds from SIGUSR2 / SIGTERM to exit: if the step and its checkpoint are not done by then, exit
    # without them (the previous checkpoint stays the newest); 0: no limit. Keep it under SLURM's
    # --signal lead time, so the job ends on its own terms rather than by SIGKILL.
    preempt_grace_s: float = 0.0
    log_every: int = 1
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    precision: str = "auto"  # auto (bf16 autocast on CUDA, fp32 on CPU) | fp32 | bf16
    # a step whose loss or gradient norm is not finite is skipped (no update; counted as skipped_nonfinite,
    # its global sample indices appended to RUN_DIR/nonfinite_batches.jsonl); this many in a row stop the
    # run, the newest checkpoint being from before them. 0: stop at the first. DeepSpeed always stops.
    nonfinite_patience: int = 3
    inject_nonfinite_steps: list[int] = field(default_factory=list)  # fault injection: NaN loss at these steps
    inject_kill_in_checkpoint: int = 0  # fault injection: SIGKILL itself mid-way through this step's checkpoint


@dataclass
class ParallelConfig:
    """How the model is spread over processes; applied from outside the model by
    `lflm_dist.parallel.build_parallel` (see docs/parallel.md)."""
    strategy: str = "ddp"  # ddp (one process is plain single-device training) | fsdp2 | deepspeed
    backend: str = "auto"  # auto: nccl on CUDA, gloo otherwise
    tp: int = 1  # tensor-parallel degree (megatron-core); data-parallel degree = world size / tp
    zero_stage: int = 0  # deepspeed: 1 | 2 | 3; 0 = the stage in ds_config (or 1 without one)
    ds_config: str = ""  # deepspeed: JSON (e.g. configs/deepspeed/zero3.json) merged under the generated config
    offload_optimizer: bool = False  # deepspeed ZeRO: optimizer state in CPU memory
    offload_params: bool = False  # deepspeed ZeRO-3: parameters in CPU memory
    activation_checkpointing: bool = False  # recompute each transformer block in backward
    compile: bool = False  # torch.compile each transformer block (in place; names unchanged)


SUPPORTED_PARALLEL = "ddp, fsdp2, deepspeed (ZeRO 1/2/3), ddp + tp (TP x DDP), fsdp2 + tp (TP x FSDP2)"


@dataclass
class SampleConfig:
    num_samples: int = 3
    prompt: str = "ROMEO."
    max_new_tokens: int = 32
    steps: int = 8  # Euler steps per latent block
    guidance: float = 1.0  # classifier-free guidance scale; 1.0 = off
    # Cola: each Euler step re-draws this fraction of its noise estimate (rho in
    # x_s = (1-s) x0_hat + s (sqrt(1-rho^2) eps_hat + rho xi)); 0 = the deterministic ODE
    churn: float = 0.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> "SampleConfig":
        if not 0.0 <= self.churn <= 1.0:
            raise ConfigError(f"sample.churn must be in [0, 1] (0 = deterministic sampling), got {self.churn}")
        return self

    def sampler_kwargs(self) -> dict:
        """The keyword arguments every family's `sample` takes (each ignores what it has no use for)."""
        return {"steps": self.steps, "guidance": self.guidance, "churn": self.churn, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p}


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)

    def validate(self) -> "Config":
        from lflm_dist.models.registry import family_class  # models import this module
        family = family_class(self.model.family)  # an unknown family lists the registered ones
        _choice("model.attention", self.model.attention, ("auto", "flex", "sdpa", "dense"))
        _choice("parallel.strategy", self.parallel.strategy, ("ddp", "fsdp2", "deepspeed"))
        self._validate_parallel()
        self.sample.validate()
        _choice("data.loader", self.data.loader, ("indexed", "stream"))
        _choice("data.on_corrupt", self.data.on_corrupt, ("error", "skip"))
        for key in ("path", "train_split", "valid_split"):
            value = getattr(self.data, key)
            if value.startswith(("http://", "https://", "pipe:")) and self.data.loader != "stream":
                raise ConfigError(f"data.{key}={value!r} is remote: set data.loader=stream (indexed mode needs "
                                  "random access to local shards)")
        if self.data.path.startswith("pipe:") and "{path}" not in self.data.path:
            raise ConfigError(f"data.path={self.data.path!r}: a pipe: command needs {{path}} where the file's path "
                              "under the data dir goes (e.g. 'pipe:aws s3 cp s3://bucket/data/{path} -')")
        _choice("train.precision", self.train.precision, ("auto", "fp32", "bf16"))
        _choice("run.wandb_mode", self.run.wandb_mode, ("offline", "online", "disabled"))
        if self.train.nonfinite_patience < 0:
            raise ConfigError(f"train.nonfinite_patience must be >= 0, got {self.train.nonfinite_patience}")
        for key in ("train.max_steps", "train.global_batch_size", "train.grad_accum", "train.ckpt_every",
                    "model.seq_len"):
            if get_dotted(self, key) <= 0:
                raise ConfigError(f"{key} must be > 0, got {get_dotted(self, key)}")
        family.validate_config(self)  # the family's own sections
        return self

    def _validate_parallel(self) -> None:
        p = self.parallel
        _choice("parallel.backend", p.backend, ("auto", "nccl", "gloo"))
        _choice("parallel.zero_stage", p.zero_stage, (0, 1, 2, 3))
        if p.tp < 1:
            raise ConfigError(f"parallel.tp must be >= 1, got {p.tp}")
        if p.tp > 1 and p.strategy not in ("ddp", "fsdp2"):
            raise ConfigError(f"parallel.tp={p.tp} cannot be combined with parallel.strategy={p.strategy}; "
                              f"supported combinations: {SUPPORTED_PARALLEL}")
        if p.strategy != "deepspeed":
            for key in ("zero_stage", "ds_config", "offload_optimizer", "offload_params"):
                if getattr(p, key) != getattr(ParallelConfig, key):
                    raise ConfigError(f"parallel.{key} only applies to parallel.strategy=deepspeed "
                                      f"(strategy is {p.strategy}); supported combinations: {SUPPORTED_PARALLEL}")
        if p.offload_params and p.zero_stage not in (0, 3):
            raise ConfigError("parallel.offload_params needs ZeRO stage 3 (parallel.zero_stage=3)")
        if p.ds_config and not Path(p.ds_config).is_file():
            raise ConfigError(f"parallel.ds_config: file not found: {p.ds_config}")
        if p.tp > 1:
            m = self.model
            if m.vocab_size and m.vocab_size % p.tp:  # 0: from the tokenizer, checked again when TP is applied
                raise ConfigError(f"parallel.tp={p.tp} must divide model.vocab_size ({m.vocab_size}): the "
                                  "embeddings, vocabulary heads and cross-entropy are vocab-parallel")


def _choice(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


# ----------------------------------------------------------------------------- loading
def load_config(path: str | Path | None = None, overrides: list[str] | tuple = ()) -> Config:
    """Build a Config from a YAML file (optional) plus `dotted.key=value` overrides."""
    return from_dict(Config, read_raw(path, overrides, "config file"), "").validate()


def read_raw(path: str | Path | None, overrides: list[str] | tuple, what: str) -> dict:
    """A YAML mapping (optional file) with `dotted.key=value` overrides applied, values parsed as
    YAML; shared by training configs and sweep configs (lflm_dist.sweeps.config)."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{what} not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like dotted.key=value")
        key, value = item.split("=", 1)
        set_dotted(raw, key.strip(), yaml.safe_load(value) if value != "" else "")
    return raw


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    """Set raw[a][b]... = value; a number indexes a list (budgets.0.flops=1e18)."""
    node: Any = raw
    parts = dotted.split(".")
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not p.isdigit() or int(p) >= len(node):
                raise ConfigError(f"cannot set {dotted}: {'.'.join(parts[:i]) or '<top>'} is a list of {len(node)}, "
                                  f"{p!r} is not an index in it")
            if last:
                node[int(p)] = value
            else:
                node = node[int(p)]
        elif isinstance(node, dict):
            if last:
                node[p] = value
            else:
                node = node.setdefault(p, {})
        else:
            raise ConfigError(f"cannot set {dotted}: {'.'.join(parts[:i])} is not a section")


def from_dict(cls: type, raw: Any, prefix: str, what: str = "config") -> Any:
    """Recursively build dataclass `cls` from a mapping, rejecting unknown keys and wrong types
    (`what` names the kind of file in errors: training or sweep config)."""
    where = prefix or "<top level>"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
            raise ConfigError(f"unknown {what} key {dotted}{hint}; known keys here: {', '.join(names)}")
        kwargs[key] = _coerce(hints[key], value, dotted, what)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, dotted: str, what: str = "config") -> Any:
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, dotted, what)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # e.g. a size name or an #SBATCH value written as a number
    if tp in (int, float, str, bool):
        if type(value) is not tp:
            raise ConfigError(f"{dotted} must be {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{dotted} must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{dotted}.{i}", what) for i, v in enumerate(value)] if args else value
    if origin is dict and args:
        if not isinstance(value, dict):
            raise ConfigError(f"{dotted} must be a mapping, got {type(value).__name__} {value!r}")
        return {str(k): _coerce(args[1], v, f"{dotted}.{k}", what) for k, v in value.items()}
    return value


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def get_dotted(cfg: Any, dotted: str) -> Any:
    node = cfg
    for p in dotted.split("."):
        node = getattr(node, p)
    return node
