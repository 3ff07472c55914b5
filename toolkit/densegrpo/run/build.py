"""Turn a :class:`~densegrpo.contracts.config.RunConfig` into ready components (no training logic here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from densegrpo.contracts import registry
from densegrpo.contracts.config import ComponentSpec, RewardSpec, RunConfig
from densegrpo.contracts.errors import ConfigError
from densegrpo.contracts.protocols import conform
from densegrpo.method.per_reward import PerRewardAdvantage
from densegrpo.method.reward_scorer import WeightedReward


@dataclass
class Components:
    """Everything one run composes."""

    policy: Any
    sampler: Any
    rewards: list[WeightedReward]
    advantage: Any
    calibrator: Any


def policy_config(spec: ComponentSpec, device: str) -> dict[str, Any]:
    """The policy's options, with the run's device filled in when the policy has a ``device`` field."""
    options = dict(spec.config)
    cls = registry.load_class("policies", spec.name)
    if "device" in getattr(cls.Config, "model_fields", {}) and "device" not in options:
        options["device"] = device
    return options


def check_device(name: str) -> None:
    """Fail with one line, before any weights load, when ``name`` is no torch device or one this
    machine does not have."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device '{name}' is not a torch device; use 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"device '{name}': torch finds no CUDA GPU on this machine; use --set device=cpu")
        if device.index is not None and device.index >= count:
            raise ConfigError(f"device '{name}': this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device '{name}': torch finds no Apple GPU (MPS) on this machine; use --set device=cpu")


def build_policy(config: RunConfig) -> Any:
    check_device(config.device)
    return registry.load("policies", config.policy.name, policy_config(config.policy, config.device))


def build_rewards(specs: list[RewardSpec]) -> list[WeightedReward]:
    return [WeightedReward(s.name, s.weight, registry.load("rewards", s.name, s.config)) for s in specs]


def build_estimator(config: RunConfig) -> Any:
    """The configured estimator; with ``reward_combine: sum-advantages`` and several rewards,
    wrapped so that it runs once per reward (:class:`~densegrpo.method.per_reward.PerRewardAdvantage`)."""
    estimator = conform("advantages", registry.load("advantages", config.advantage.name, config.advantage.config))
    if config.reward_combine == "sum-advantages" and len(config.rewards) > 1:
        estimator = PerRewardAdvantage(estimator, [spec.weight for spec in config.rewards])
    return estimator


def build(config: RunConfig, policy: Any | None = None) -> Components:
    """Load every slot of ``config``; pass ``policy`` to reuse an already built one.

    Each component is checked against its protocol and given the declared defaults of the
    optional members it leaves out (:func:`densegrpo.contracts.protocols.conform`).
    """
    return conformed(Components(
        policy=policy if policy is not None else build_policy(config),
        sampler=registry.load("samplers", config.sampler.name, config.sampler.config),
        rewards=build_rewards(config.rewards),
        advantage=build_estimator(config),
        calibrator=registry.load("calibrators", config.calibrator.name, config.calibrator.config),
    ))


def conformed(parts: Components) -> Components:
    """``parts`` with every component checked by :func:`densegrpo.contracts.protocols.conform` (idempotent)."""
    conform("policies", parts.policy)
    conform("samplers", parts.sampler)
    for reward in parts.rewards:
        conform("rewards", reward.model)
    conform("advantages", parts.advantage)
    conform("calibrators", parts.calibrator)
    return parts
