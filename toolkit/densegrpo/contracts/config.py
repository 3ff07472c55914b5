"""The run configuration: pydantic models, YAML/TOML loading and ``--set`` overrides.

Every field has a description; those texts feed ``densegrpo config show`` and the error
messages. Defaults describe the embedded toy run: DenseGRPO on the toy policy with the
toy GenEval reward, offline, on a CPU, in minutes.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator

from densegrpo.contracts.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STRICT = ConfigDict(extra="forbid", validate_assignment=True)
RUN_CONFIG = "config.yaml"
"""The resolved config a run folder keeps (see :mod:`densegrpo.run.runs`)."""


class ComponentSpec(BaseModel):
    """One slot of the run: a registered component and its own config."""

    model_config = STRICT
    name: str = Field(description="Registered component name (see `densegrpo plugins`) or 'module:attr'.")
    config: dict[str, Any] = Field(
        default_factory=dict, description="Options for the component's own pydantic Config."
    )


class RewardSpec(ComponentSpec):
    """A reward model and its weight in a multi-reward sum."""

    weight: float = Field(1.0, description="Weight of this reward in the weighted sum (Flow-GRPO multi-reward).")


class PromptConfig(BaseModel):
    """Where training and evaluation prompts come from."""

    model_config = STRICT
    train: str = Field(
        "toy-train",
        description="Training prompts (the toy run: all 234 of toy-train): 'toy-train', 'toy-train-focus', "
        "'toy-test' or a path to a GenEval-format JSONL "
        "(one {'prompt', 'tag', 'include', ...} object per line) or a plain text file (one prompt per line).",
    )
    test: str = Field("toy-test", description="Evaluation prompts, same formats as `train`.")


class SamplingConfig(BaseModel):
    """The sigma grid and guidance used for rollouts (method.md section 1)."""

    model_config = STRICT
    num_steps: int = Field(10, ge=1, le=1000, description="T, sampling steps per training rollout (paper: 10).")
    eval_steps: int = Field(40, ge=1, le=1000, description="ODE steps for evaluation and sample grids (paper: 40).")
    shift: float = Field(3.0, gt=0, description="Timestep shift of the sigma grid, as SD3's FlowMatchEulerDiscreteScheduler (3.0).")
    chunk_size: int | None = Field(
        None,
        ge=1,
        description="Rows (samples) per no-grad model call and per VAE decode, in the rollout, the reward scoring, the "
        "dense-reward engine's completions and the evaluation alike (with classifier-free guidance the transformer "
        "sees twice as many); results equal the unchunked ones to float tolerance, and memory stops growing with the "
        "batch (null: the rollout and the terminal decode take the whole per-rank batch at once, the dense engine "
        "256 rows per call, as before).",
    )


class TrainConfig(BaseModel):
    """The GRPO objective and optimiser (method.md section 2)."""

    model_config = STRICT
    group_size: int = Field(8, ge=2, description="G, samples per prompt group (paper: 24).")
    groups_per_iteration: int = Field(32, ge=1, description="Prompt groups sampled per iteration; N = G * groups (toy run: 32 x 8 = 256).")
    same_noise_per_group: bool = Field(
        True,
        description="Start every member of a group from the same initial noise, so the group's rewards differ only "
        "through the sampler's noise (Flow-GRPO's same_latent option); the toy run uses it.",
    )
    clip_range: float = Field(1e-4, gt=0, description="PPO clip epsilon on the ratio (paper: 1e-4, since log-probs are per-dimension means).")
    beta: float = Field(0.01, ge=0, description="Weight of the KL term to the reference model (paper: 0.04 GenEval/OCR, 0.01 PickScore; toy run 0.01).")
    kl: Literal["flow-grpo", "exact"] = Field(
        "flow-grpo",
        description="Form of the KL term, mean((mean_theta - mean_ref)^2) / (2 s^2) (method.md section 2). 'flow-grpo': s is "
        "the sampler's SDE coefficient std_t without sqrt(-dt), as Flow-GRPO's scripts/train_sd3.py (kl_loss = ... / "
        "(2 * std_dev_t ** 2), std_dev_t from sde_step_with_logprob), the form its beta values are tuned for. 'exact': s "
        "is the transition std step_std, the exact KL of the Gaussian steps: 1/(-dt) times larger for flow-sde "
        "(3.7x to 25x on 10 steps with shift 3), the same for cps.",
    )
    cfg_grad: Literal["conditional", "both"] = Field(
        "conditional",
        description="With classifier-free guidance in the loss (policy cfg_during_training and guidance_scale > 1): "
        "'conditional' detaches the unconditional prediction, v = v_neg.detach() + g (v_pos - v_neg.detach()), as "
        "Flow-GRPO's scripts/train_sd3.py (compute_log_prob: noise_pred_uncond.detach()); 'both' lets gradients flow "
        "through both branches. No effect without guidance in the loss.",
    )
    drop_zero_advantage: bool = Field(
        True,
        description="Leave out of the loss (policy and KL terms, and their means) every sample whose advantage is zero "
        "at every step, as Flow-GRPO's scripts/train_sd3.py (it filters the samples whose advantages are all zero); a "
        "minibatch left with no sample makes no optimizer step. Logged as zero_advantage_dropped (share of the batch).",
    )
    ratio_norm: bool = Field(
        False,
        description="GRPO-Guard's RatioNorm (arXiv 2510.22319; method.md section 2, per-step controls): clip the ratio "
        "exp(s (log p_theta - log p_old - E_old[log p_theta - log p_old])) in place of exp(log p_theta - log p_old), "
        "s the step's transition std and E_old[...] = -mean((mean_theta - mean_old)^2) / (2 s^2) the ratio's "
        "closed-form mean under the rollout, so every step's ratio is centred on 1 with a spread that does not grow as "
        "the noise shrinks (Flow-GRPO's scripts/train_sd3_GRPO_Guard.py lines 915-919). Its ratios are about s times "
        "narrower: GRPO-Guard's configs clip at 2e-6 (OCR) and 4e-6 (PickScore) (config/grpo_guard.py lines 76, 124).",
    )
    step_weighting: Literal["none", "grpo-guard", "tempflow"] = Field(
        "none",
        description="Weight w_k of each step's policy loss (the KL term keeps weight 1; method.md section 2, per-step "
        "controls). 'none': 1 (Flow-GRPO, DenseGRPO). 'grpo-guard': 1 / (-dt_k), GRPO-Guard's gradient reweighting "
        "(scripts/train_sd3_GRPO_Guard.py lines 931-932), meant with ratio_norm: true; 3.7 to 25 on the 9 trained of 10 steps "
        "with shift 3, so the loss grows: GRPO-Guard trains at lr 1e-4 (config/grpo_guard.py lines 78, 126). 'tempflow': step_std_k / mean over the trained steps of "
        "step_std, TempFlow-GRPO's noise-aware weighting (arXiv 2508.04324, its scripts/train_sd3_pr.py: 2.25 * "
        "std_dev_t * the PPO terms), normalised to mean 1.",
    )
    advantage_clip: float = Field(5.0, gt=0, description="Advantages are clipped to +-this value (paper: 5).")
    timestep_fraction: float = Field(
        0.99, gt=0, le=1, description="Share of steps trained; the last step is dropped at 0.99 (9 of 10, as Flow-GRPO)."
    )
    inner_epochs: int = Field(1, ge=1, description="Optimisation passes over each batch of rollouts.")
    minibatch_size: int = Field(
        0,
        ge=0,
        description="Samples of the global batch per optimizer step (0: the whole batch, one step per inner epoch). "
        "Each inner epoch walks the batch in order (or shuffled: shuffle_minibatches) in ceil(N / minibatch_size) "
        "minibatches (the last one smaller when it does not divide N) and makes one optimizer step per minibatch, on "
        "the mean of its samples' losses over their trained steps (gradient accumulation over the steps; a minibatch "
        "whose samples were all dropped makes no step). So inner_epochs * ceil(N / minibatch_size) optimizer steps per iteration. Flow-GRPO's 2 steps per "
        "epoch (config/grpo.py: gradient_accumulation_steps = num_batches_per_epoch // 2) is N / 2, 576 of 1152.",
    )
    micro_batch_size: int | None = Field(
        None,
        ge=1,
        description="Samples per forward pass with gradients, per process (with classifier-free guidance in the loss "
        "the transformer sees twice as many rows; beta > 0 adds a no-grad reference pass of the same size). Each trained "
        "step of a minibatch runs on the process's rows in micro-batches of at most this many, as many on every process "
        "as the busiest needs, each micro-batch's loss scaled by its share of the rows: the accumulated gradient, the "
        "optimizer steps, their number and the logged numbers are those of the whole minibatch up to float rounding, "
        "and the loss's activations stop growing with the batch (per-step gradient norms then keep one copy of the "
        "trainable weights' gradient). Flow-GRPO runs 9 per forward. null: the process's whole minibatch in one forward.",
    )
    shuffle_minibatches: bool = Field(
        False,
        description="Shuffle the global batch before cutting each inner epoch into minibatches, as Flow-GRPO's randperm "
        "re-batching. The order is seeded by (seed, iteration, epoch) alone: the same on every process and on resume. "
        "Each process trains the samples of a minibatch it holds, so a minibatch is the same samples for any number of "
        "processes; a process's share varies around minibatch_size / W and is weighted so the gradient stays the "
        "minibatch's mean. false: rows in order, so a minibatch holds whole prompt groups. No effect with one minibatch "
        "per epoch (minibatch_size 0).",
    )
    learning_rate: float = Field(1e-3, gt=0, description="AdamW learning rate (paper: 3e-4 for SD3.5-M; the toy run's short budget uses 1e-3, which beat 3e-3 there: docs/toy-alignment.md).")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay (paper: 1e-4).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    ema_decay: float = Field(0.0, ge=0, lt=1, description="EMA of trainable weights for evaluation; 0 disables it.")
    data_parallel: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="With several processes: 'ddp' replicates the model and averages gradients (DistributedDataParallel; "
        "LoRA), 'fsdp' shards weights, gradients and optimizer state (FSDP2; full fine-tuning, policy lora.enabled: false). "
        "Unused in one process.",
    )


class WandbConfig(BaseModel):
    """Weights & Biases logging (the ``densegrpo[wandb]`` extra): config, metrics, grids and curves."""

    model_config = STRICT
    enabled: bool = Field(False, description="Log the run to Weights & Biases (needs the wandb package: pip install 'densegrpo[wandb]').")
    project: str = Field("densegrpo", description="W&B project the run is logged to.")
    entity: str | None = Field(None, description="W&B team or user (null: your default entity).")
    name: str | None = Field(None, description="W&B run name (null: the run folder's name).")
    group: str | None = Field(None, description="W&B group, e.g. to gather the seeds of one sweep (null: none).")
    tags: list[str] = Field(default_factory=list, description="W&B tags of the run.")
    mode: Literal["online", "offline", "disabled"] | None = Field(
        None, description="W&B mode: 'online', 'offline' (write locally, upload later with `wandb sync`) or 'disabled' "
        "(null: the WANDB_MODE environment variable, else online).",
    )
    dir: str | None = Field(None, description="Folder W&B writes its files under (null: the WANDB_DIR environment variable, else the run folder).")


class LoggingConfig(BaseModel):
    """What a run writes besides metrics.jsonl."""

    model_config = STRICT
    sample_every: int = Field(
        50, ge=0, description="Write a PNG sample grid and run the evaluation every K iterations (0: only at the end; "
        "the toy run evaluates every 50 of its 300)."
    )
    sample_prompts: int = Field(8, ge=0, le=64, description="Test prompts shown in each sample grid (0: no grids).")
    eval_prompts: int = Field(
        81, ge=0, description="Test prompts scored with ODE sampling at each sample_every (0: no evaluation; the toy has 81). "
        "Logged as eval_reward, with eval_gain +- eval_gain_se: the mean per-image change from the base policy on the same noise.",
    )
    eval_images_per_prompt: int = Field(
        16, ge=1, le=64, description="ODE images per evaluation prompt, each from its own fixed noise (more images: a less noisy eval_reward "
        "and a smaller eval_gain_se; the toy run's 81 x 16 costs a few seconds per evaluation on 2 CPU threads)."
    )
    train_eval_images_per_prompt: int = Field(
        16, ge=0, le=64, description="ODE images per training prompt for a second evaluation, on the first eval_prompts prompts of "
        "prompts.train, the prompts the policy is optimised on (0: off; the toy run scores 81 of its 234 x 16). Logged as train_eval_reward, with train_eval_gain +- "
        "train_eval_gain_se, beside the held-out eval_reward: a rise here and not there means the policy fitted its "
        "prompts without generalising.",
    )
    monitor_rewards: list[RewardSpec] = Field(
        default_factory=list,
        description="Rewards watched, never trained on (same specs as `rewards`; weight unused): each scores the "
        "evaluation's ODE images of the held-out prompts and is logged as monitor_<label>_reward (label: the name in "
        "lower case, other signs than letters and digits as '_', e.g. monitor_toy_geneval_reward), with "
        "monitor_<label>_gain +- monitor_<label>_gain_se paired with the base policy's images as eval_gain, and drawn "
        "in reward_curve.png. A trained reward that rises while a monitor falls is the mark of reward hacking "
        "(Flow-GRPO issues #92, #233): see monitor_warn_se.",
    )
    monitor_warn_se: float = Field(
        1.0, gt=0, description="Warn (RewardHackingWarning, and the metric reward_hacking listing the monitors) at "
        "an evaluation where eval_gain > K * eval_gain_se while a monitor's gain < -K * its gain_se: the trained "
        "reward rose and the monitor fell, each beyond K standard errors.",
    )
    step_diagnostics: bool = Field(
        True, description="Draw step_diagnostics.png at each evaluation: per step k, the dense gain mean and its "
        "positive share, the noise level psi, the gradient norm and the clip fraction, one line per evaluation window.",
    )
    tensorboard: bool = Field(False, description="Also write TensorBoard scalars (needs the tensorboard package).")
    wandb: WandbConfig = Field(default_factory=WandbConfig, description="Weights & Biases logging (off by default).")
    progress: bool = Field(True, description="Show a progress bar.")


class CalibrationConfig(BaseModel):
    """When reward-aware calibration runs (DenseGRPO Algorithm 1)."""

    model_config = STRICT
    before_training: bool = Field(True, description="Run the calibrator's rounds once before training (the paper's schedule).")
    online_every: int = Field(0, ge=0, description="Also update the calibrator from each K-th iteration's dense gains (0: never).")


class RunConfig(BaseModel):
    """A full training run. Every slot is a registered component plus its config."""

    model_config = STRICT
    seed: int = Field(0, ge=0, description="Seed for noise, prompt order and initialisation; runs are deterministic on CPU.")
    iterations: int = Field(300, ge=0, description="GRPO iterations (rollout + update) to run (the toy run: 300).")
    checkpoint_every: int = Field(10, ge=0, description="Write a checkpoint every K iterations (0: only at the end).")
    device: str = Field("cpu", description="Torch device for the policy, e.g. 'cpu' or 'cuda'.")
    tf32: bool = Field(
        True,
        description="On CUDA, let float32 matmuls and convolutions use TF32 tensor cores, as Flow-GRPO does "
        "(torch.backends.cuda.matmul.allow_tf32 and cudnn.allow_tf32); no effect on the CPU.",
    )
    collective_timeout_s: float = Field(
        1800.0,
        gt=0,
        description="Seconds a collective (all-gather, all-reduce, barrier) may wait for the other processes before "
        "the job fails instead of hanging on a dead rank. torch's default is 10 minutes for NCCL "
        "(torch.distributed.constants.default_pg_nccl_timeout) and 30 for gloo; ours is 30 on both, because the "
        "longest legitimate waits are one rank's alone (rank 0 writing a checkpoint while the others wait in a "
        "barrier, a reward model loading on first use), and these can pass 10 minutes on a slow shared file system.",
    )
    policy: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="toy-latent"),
        description="The flow-matching model being aligned (the toy run: the latent toy, a (4, 4, 4) latent decoded to 32 px).",
    )
    sampler: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="flow-sde"), description="The stochastic sampler used for rollouts."
    )
    rewards: list[RewardSpec] = Field(
        default_factory=lambda: [RewardSpec(name="toy-geneval")],
        min_length=1,
        description="Reward models; several are combined as set by `reward_combine`.",
    )
    reward_combine: Literal["sum-rewards", "sum-advantages"] = Field(
        "sum-rewards",
        description="Multi-reward: weighted sum of raw rewards before normalisation (Flow-GRPO) or of per-reward advantages.",
    )
    advantage: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="dense"), description="How rewards become per-step advantages."
    )
    calibrator: ComponentSpec = Field(
        default_factory=lambda: ComponentSpec(name="reward-aware", config={"max_rounds": 6, "samples_per_round": 16}),
        description="How the per-step SDE noise level is chosen (the toy run calibrates 6 rounds of 16 samples).",
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="When calibration runs.")
    prompts: PromptConfig = Field(default_factory=PromptConfig, description="Prompt sources.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Sigma grid and steps.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="GRPO objective and optimiser.")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Metrics, evaluation and sample grids.")
    hooks: list[ComponentSpec] = Field(
        default_factory=list,
        description="Extra hooks run after each iteration (registered names or 'module:attr'), before metrics and "
        "checkpoints are written; see CONTRIBUTING.md.",
    )


    @model_validator(mode="after")
    def _check_across_sections(self) -> "RunConfig":
        """Checks that read more than one field, so a bad combination fails before anything is built."""
        batch = self.train.group_size * self.train.groups_per_iteration
        if self.train.minibatch_size > batch:
            raise ValueError(
                f"train.minibatch_size={self.train.minibatch_size} exceeds the batch of train.group_size x "
                f"train.groups_per_iteration = {batch} samples; set it to at most {batch} (0: the whole batch)"
            )
        if self.reward_combine == "sum-advantages" and len(self.rewards) == 1:
            raise ValueError(
                "reward_combine=sum-advantages needs at least two rewards (with one it is sum-rewards); "
                "add a reward or use reward_combine=sum-rewards"
            )
        return self


def default_config() -> RunConfig:
    """The embedded toy DenseGRPO run."""
    return RunConfig()


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist; check the path or run `densegrpo config show` for a template")
    if path.is_dir():
        again = f"; to continue the run in it, pass --resume {path}" if (path / RUN_CONFIG).is_file() else ""
        raise ConfigError(f"'{path}' is a folder; pass a .yaml or .toml config file{again}")
    suffix = path.suffix.lower()
    if suffix not in {".toml", ".yaml", ".yml", ".json"}:
        raise ConfigError(f"config file '{path}' must end in .yaml, .yml, .toml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file '{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                          f"{error.start}); save it as UTF-8 YAML or TOML") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file '{path}': {error.strerror or error}") from None
    try:
        if suffix == ".toml":
            data = tomllib.loads(text)
        else:
            data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"malformed YAML in '{path}'{where}: {problem}; fix the syntax") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"malformed TOML in '{path}': {error}; fix the syntax") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping at the top level, not {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"train.beta=0.01"`` -> ``(["train", "beta"], 0.01)``; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"--set '{text}' must look like key.path=value, e.g. --set train.beta=0.01")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return [p for p in key.strip().split(".")], value


def apply_override(data: dict[str, Any], path: list[str], value: Any) -> None:
    """Set ``data[path] = value`` in place; every key up to a component's free ``config`` must exist."""
    node: Any = data
    dotted = ".".join(path)
    for depth, part in enumerate(path):
        last = depth == len(path) - 1
        free_form = depth > 0 and path[depth - 1] == "config"
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"--set {dotted}: '{part}' is not an index of a list of length {len(node)}")
            if last:
                node[int(part)] = value
                return
            node = node[int(part)]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(path[:depth])}' is a value, not a section")
        if part not in node and not free_form and not _inside_config(path, depth):
            options = ", ".join(sorted(node)) if node else "none"
            raise ConfigError(f"--set {dotted}: unknown key '{part}'; valid keys here: {options}")
        if last:
            if part == "name" and isinstance(node.get("config"), dict) and node.get("name") != value:
                node["config"] = {}  # another component: the previous one's options do not apply
            node[part] = value
            return
        if part not in node:
            node[part] = {}
        node = node[part]


def _inside_config(path: list[str], depth: int) -> bool:
    return "config" in path[:depth]


def resolve(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Load a config file (or the default), apply ``--set`` overrides and validate."""
    data = default_config().model_dump(mode="json")
    if path is not None:
        _merge(data, _read_mapping(Path(path)))
    for text in overrides or []:
        keys, value = parse_override(text)
        apply_override(data, keys, value)
    return validate(data, source=str(path) if path else "default config")


def validate(data: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(data)
    except pydantic.ValidationError as error:
        from densegrpo.contracts.registry import format_validation_error

        raise ConfigError(format_validation_error(error, prefix=source)) from None


def _merge(base: dict[str, Any], update: dict[str, Any]) -> None:
    """Deep-merge a file's mapping into the defaults; component ``config`` dicts are replaced."""
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict) and key != "config":
            if "name" in value and value.get("name") != base[key].get("name"):
                base[key] = dict(value)  # another component: drop the old one's options
            else:
                _merge(base[key], value)
        else:
            base[key] = value


def validate_components(config: RunConfig) -> None:
    """Check every component name and its options against the registry (imports the classes)."""
    from densegrpo.contracts import registry

    registry.validate_config("policies", config.policy.name, config.policy.config)
    registry.validate_config("samplers", config.sampler.name, config.sampler.config)
    for spec in config.rewards:
        registry.validate_config("rewards", spec.name, spec.config)
    registry.validate_config("advantages", config.advantage.name, config.advantage.config)
    registry.validate_config("calibrators", config.calibrator.name, config.calibrator.config)
    for spec in config.hooks:
        registry.validate_config("hooks", spec.name, spec.config)
    for spec in config.logging.monitor_rewards:
        registry.validate_config("rewards", spec.name, spec.config)


def dump(config: RunConfig, fmt: Literal["yaml", "json"] = "yaml") -> str:
    data = config.model_dump(mode="json")
    if fmt == "json":
        return json.dumps(data, indent=2)
    return yaml.safe_dump(data, sort_keys=False)


def describe(config: RunConfig, width: int = 100) -> str:
    """:func:`dump`'s YAML with every field's description as a comment above it
    (``densegrpo config show --describe``); it loads to the same mapping."""
    return "\n".join(_described_lines(config, indent="", width=width)) + "\n"


def _described_lines(model: BaseModel, indent: str, width: int) -> list[str]:
    lines: list[str] = []
    data = model.model_dump(mode="json")
    for name, info in type(model).model_fields.items():
        if info.description:
            lines += textwrap.wrap(info.description, width=width, initial_indent=f"{indent}# ", subsequent_indent=f"{indent}# ",
                               break_on_hyphens=False)
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            lines.append(f"{indent}{name}:")
            lines += _described_lines(value, indent + "  ", width)
        else:
            block = yaml.safe_dump({name: data[name]}, sort_keys=False).rstrip("\n").splitlines()
            lines += [indent + line for line in block]
    return lines
