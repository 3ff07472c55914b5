"""The benchmark's arms (which components each compares) and profiles (how large the runs are)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from densegrpo.contracts import config as cfg
from densegrpo.contracts import registry
from densegrpo.contracts.errors import UserError


@dataclass(frozen=True)
class Arm:
    """One arm: an advantage estimator and a calibrator, both registered components.

    ``completion`` is the dense estimator's ODE completion length ``n`` (``None``: the
    estimator's default, ``n = t``). Every other option is the default run's.
    """

    description: str
    advantage: str
    calibrator: str
    completion: int | None = None

    @property
    def calibrates(self) -> bool:
        """Whether the arm runs reward-aware calibration rounds, which the profile sizes."""
        return self.calibrator == "reward-aware"

    def overrides(self, base: cfg.RunConfig | None = None) -> list[str]:
        """The ``--set`` overrides that select this arm's components. The component names come
        before their options: setting a name drops the previous component's options, so a name
        that ``base`` (a user's configuration) already has is not set again and keeps its options."""
        def name(kind: str, value: str) -> list[str]:
            current = getattr(base, kind).name if base is not None else None
            return [] if current == value else [f"{kind}.name={value}"]

        completion = [] if self.completion is None else [f"advantage.config.completion={self.completion}"]
        return [*name("advantage", self.advantage), *completion, *name("calibrator", self.calibrator)]


# The DenseGRPO arm is "densegrpo" (n = t with reward-aware calibration); the others each change one thing.
ARMS: dict[str, Arm] = {
    "flow-grpo": Arm("Flow-GRPO: sparse + uniform", "sparse", "uniform"),
    "densegrpo": Arm("DenseGRPO: dense (n = t) + reward-aware", "dense", "reward-aware"),
    "dense-uniform": Arm("dense (n = t) + uniform", "dense", "uniform"),
    "sparse-calibrated": Arm("sparse + reward-aware", "sparse", "reward-aware"),
    "dense-raw": Arm("dense-raw (R_{t-1} as step reward) + uniform", "dense-raw", "uniform"),
    "dense-n1": Arm("DenseGRPO with ODE completion n = 1", "dense", "reward-aware", completion=1),
    "dense-n2": Arm("DenseGRPO with ODE completion n = 2", "dense", "reward-aware", completion=2),
    "dense-return": Arm("dense-return (discounted reward-to-go) + reward-aware", "dense-return", "reward-aware"),
}
DEFAULT_REWARDS = ("toy-geneval",)
"""The toy world's default: the main job's reward, in [0, 1], where the verdicts' 0.02 half-width means
what it says (toy-clip's scores sit near 13 with a seed spread near 0.6); ``--reward toy-clip`` adds it."""


def parse_arm(name: str) -> tuple[str, Arm]:
    """``(label, arm)`` of an ``--arm`` value: a name in :data:`ARMS`, or a user's arm
    ``LABEL=ADVANTAGE`` or ``LABEL=ADVANTAGE+CALIBRATOR``, where each component is a registered
    name or ``module:attr`` (calibrator default ``uniform``), so a new estimator runs beside the
    built-in arms on the same seeds."""
    if name in ARMS:
        return name, ARMS[name]
    if "=" not in name:
        raise UserError(f"unknown arm '{name}'; available: {', '.join(ARMS)}, or LABEL=ADVANTAGE[+CALIBRATOR] for your own")
    label, _, components = name.partition("=")
    advantage, _, calibrator = components.partition("+")
    calibrator = calibrator or "uniform"
    if not re.fullmatch(r"[A-Za-z0-9._-]+", label) or label in ARMS:
        raise UserError(f"arm label '{label}' must be letters, digits, '.', '_' or '-' and not a built-in arm's name")
    for kind, component in (("advantages", advantage), ("calibrators", calibrator)):
        try:
            registry.load_class(kind, component)
        except (KeyError, ValueError, ImportError, AttributeError) as error:
            raise UserError(f"arm '{label}': {error}") from None
    return label, Arm(f"{label}: {advantage} + {calibrator} (your arm)", advantage, calibrator)


@dataclass
class Profile:
    """Run sizes of a benchmark profile; ``overrides`` are applied after the arm's."""

    iterations: int
    group_size: int
    groups: int
    calibration_rounds: int
    calibration_samples: int
    eval_prompts: int
    overrides: list[str] = field(default_factory=list)

    def calibration_overrides(self) -> list[str]:
        """The ``--set`` overrides that size the reward-aware calibrator's rounds."""
        return [f"calibrator.config.max_rounds={self.calibration_rounds}", f"calibrator.config.samples_per_round={self.calibration_samples}"]


PROFILES = {
    "quick": Profile(iterations=2, group_size=4, groups=2, calibration_rounds=1, calibration_samples=8, eval_prompts=4, overrides=["sampling.eval_steps=10"]),
    # On the main job's policy (toy-latent): 32 iterations of 16 x 8 samples and 81 held-out prompts x 2 images,
    # 40 runs (8 arms, 5 seeds, toy-geneval) in about 20 minutes with --jobs 2 on 2 cores.
    "default": Profile(
        iterations=32, group_size=8, groups=16, calibration_rounds=2, calibration_samples=32, eval_prompts=81,
        # no sample grids, and 2 images per evaluation prompt: evaluation would otherwise outweigh 8 iterations of training
        overrides=["logging.sample_prompts=0", "logging.eval_images_per_prompt=2"],
    ),
}


WORLDS = ("toy", "lab")  # the built-in worlds; a user's CONFIG file is the third kind


def world_config(world: str, config: Path | None, arm: str | Arm, reward: str, seed: int, profile: Profile,
                 iterations: int | None) -> cfg.RunConfig:
    """The resolved run config of ``arm`` in a benchmark world: ``toy`` (:func:`arm_config`),
    ``lab`` (:data:`densegrpo.bench.lab.LAB_OVERRIDES`, sized by itself) or a user's
    ``config`` file, which keeps its own sizes, rewards and component options; ``iterations``
    (when given) and the seed are the benchmark's."""
    spec = parse_arm(arm)[1] if isinstance(arm, str) else arm
    if world == "toy" and config is None:
        return arm_config(spec, reward, seed, profile, iterations or profile.iterations)
    quiet = [f"seed={seed}", "checkpoint_every=0", "logging.progress=false", *([f"iterations={iterations}"] if iterations else [])]
    if config is not None:
        base = cfg.resolve(config, quiet)
        return cfg.resolve(config, [*quiet, *spec.overrides(base)])
    if world == "lab":
        from densegrpo.bench.lab import LAB_OVERRIDES

        base = cfg.resolve(None, [*LAB_OVERRIDES, *quiet])
        return cfg.resolve(None, [*LAB_OVERRIDES, *quiet, *spec.overrides(base)])
    raise UserError(f"unknown world '{world}'; available: {', '.join(WORLDS)}, or pass a CONFIG file")


def reward_key(config: cfg.RunConfig) -> str:
    """The name a run's rewards are filed under in ``results.json``: their names joined by '+'."""
    return "+".join(r.name for r in config.rewards)


def toy_overrides(reward: str, profile: Profile, iterations: int) -> list[str]:
    """The ``--set`` overrides that make the default run the toy world's benchmark run on
    ``reward`` at ``profile``'s sizes, before any arm's components and the profile's own
    ``overrides``, which go last."""
    return [
        "prompts.train=toy-train",  # the whole training set, not the default run's 8-prompt focus set
        "logging.train_eval_images_per_prompt=0",
        f"iterations={iterations}",
        "checkpoint_every=0",
        f"rewards.0.name={reward}",
        f"train.group_size={profile.group_size}",
        f"train.groups_per_iteration={profile.groups}",
        "logging.progress=false",
        "logging.sample_every=0",
        "logging.sample_prompts=8",
        f"logging.eval_prompts={profile.eval_prompts}",
    ]


def arm_config(arm: str | Arm, reward: str, seed: int, profile: Profile, iterations: int) -> cfg.RunConfig:
    """The resolved run config of ``arm`` (a name in :data:`ARMS` or an :class:`Arm`) on ``reward``
    in the toy world."""
    spec = parse_arm(arm)[1] if isinstance(arm, str) else arm
    calibration = profile.calibration_overrides() if spec.calibrates else []
    return cfg.resolve(None, [f"seed={seed}", *toy_overrides(reward, profile, iterations), *spec.overrides(), *calibration, *profile.overrides])


def uniform_level(config: cfg.RunConfig) -> float:
    """The uniform noise level ``a`` of ``config``'s calibrator: the reward-aware calibrator's
    starting psi (``initial``) or the uniform calibrator's ``noise_level``."""
    name = config.calibrator.name
    options = registry.validate_config("calibrators", name, config.calibrator.config)
    if name == "reward-aware":
        return float(options.initial)
    if name == "uniform":
        return float(options.noise_level)
    raise ValueError(f"calibrator '{name}' has no uniform noise level; the benchmark's arms use 'uniform' or 'reward-aware'")
