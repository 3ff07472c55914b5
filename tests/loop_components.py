"""Tiny components for loop tests, usable by 'module:attr' in configs (tests/ on PYTHONPATH)."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Callable

import torch
from densegrpo.components.advantages.dense import DenseAdvantage
from densegrpo.contracts.protocols import Cond
from densegrpo.contracts.testing import GaussianFlowPolicy
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class AnalyticPolicy(GaussianFlowPolicy):
    """The closed-form Gaussian flow policy with a registry-style Config."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mean: float = Field(0.0, description="Initial data mean mu.")
        std: float = Field(0.5, description="Data std s.")
        size: int = Field(4, description="Latent height and width.")
        train_std: bool = Field(False, description="Whether log_std is trainable.")
        device: str = Field("cpu", description="Device.")

    def __init__(self, config: Config | None = None):
        config = config or self.Config()
        super().__init__(mean=config.mean, std=config.std, latent_shape=(3, config.size, config.size), train_std=config.train_std, device=config.device)

    def forward(self, x, sigma, cond):
        """The bare analytic velocity, the forward a DDP wrapper calls."""
        return GaussianFlowPolicy.velocity(self, x, sigma, cond)

    def data_parallel(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """Forward passes with gradients go through ``wrap(self)`` (DDP); no-grad ones stay local."""
        # Kept out of nn.Module's registry: the wrapper owns this module, not the other way round.
        object.__setattr__(self, "_parallel", wrap(self))

    def velocity(self, x, sigma, cond):
        parallel = self.__dict__.get("_parallel")
        if parallel is not None and torch.is_grad_enabled():
            return parallel(x, sigma, cond)
        return super().velocity(x, sigma, cond)


class BrightnessReward:
    """Higher when the image's mean brightness is closer to ``target``."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        target: float = Field(0.8, description="Brightness that scores best.")

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()

    def __call__(self, images, prompts, metadata):
        return -(images.float().mean(dim=(1, 2, 3)) - self.config.target).abs()


class ConstantReward:
    """The same reward for every image: every group has zero spread, so every advantage is 0."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        value: float = Field(0.5, description="The reward of every image.")

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()

    def __call__(self, images, prompts, metadata):
        return torch.full((images.shape[0],), self.config.value)


class TiedOnEvenPrompts(BrightnessReward):
    """Brightness, except that prompts of even length score a constant: their groups are tied."""

    def __call__(self, images, prompts, metadata):
        scores = super().__call__(images, prompts, metadata)
        tied = torch.tensor([len(p) % 2 == 0 for p in prompts], device=scores.device)
        return torch.where(tied, torch.full_like(scores, 0.5), scores)


class DenseEveryState:
    """DenseGRPO's estimator, but asking for every state: the reference for the skipping test."""

    Config = DenseAdvantage.Config

    def __init__(self, config=None):
        self.inner = DenseAdvantage(config)
        self.needs = replace(self.inner.needs, step_local=False)
        self.last_stats = {}

    def __call__(self, rewards):
        advantages = self.inner(rewards)
        self.last_stats = self.inner.last_stats
        return advantages


class RecordingHook:
    """A user hook: adds ``tag_iteration`` to every metrics record and counts its calls."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        tag: str = Field("seen", description="Key prefix written into each record.")

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        self.calls: list[str] = []

    def before_training(self, run):
        self.calls.append("before")

    def after_iteration(self, run, record):
        self.calls.append("after")
        record[f"{self.config.tag}_iteration"] = record["iteration"]

    def after_training(self, run, summary):
        self.calls.append("end")
        summary[f"{self.config.tag}_calls"] = len(self.calls)


class LossForwardSpy(AnalyticPolicy):
    """Counts the velocity calls made inside ``loss_forward()``, and those outside it."""

    def __init__(self, config=None):
        super().__init__(config)
        self.inside = 0
        self.counts = {"loss": 0, "other": 0}

    @contextmanager
    def loss_forward(self, cfg_grad="conditional"):
        self.cfg_grad = cfg_grad
        self.inside += 1
        try:
            yield
        finally:
            self.inside -= 1

    def velocity(self, x, sigma, cond):
        self.counts["loss" if self.inside else "other"] += 1
        return super().velocity(x, sigma, cond)


class FaultyReward(BrightnessReward):
    """BrightnessReward that goes wrong from its ``at_call``-th call on, in the way ``fault`` names
    (raise, shape, dtype, device, inf, nan): the failing plugins of tests/test_faults.py."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        target: float = Field(0.8, description="Brightness that scores best.")
        fault: str = Field("raise", description="raise, shape, dtype, device, inf or nan.")
        at_call: int = Field(1, description="The first call (1-based) that goes wrong.")

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        self.calls = 0

    def __call__(self, images, prompts, metadata):
        self.calls += 1
        scores = super().__call__(images, prompts, metadata)
        if self.calls < self.config.at_call:
            return scores
        fault = self.config.fault
        if fault == "raise":
            raise RuntimeError("scoring server unreachable:\n  connection refused")
        if fault == "shape":
            return scores[:, None].expand(-1, 2)
        if fault == "dtype":
            return (scores > 0).long()
        if fault == "device":
            return scores.to("meta")
        if fault == "inf":
            return torch.where(torch.arange(len(scores)) == 1, torch.tensor(float("inf")), scores)
        if fault == "nan":
            return torch.where(torch.arange(len(scores)) % 2 == 1, torch.tensor(float("nan")), scores)
        raise ValueError(f"unknown fault {fault!r}")


class PauseHook:
    """A user hook that sleeps after every iteration: it keeps a short run alive long enough to
    be signalled (tests/test_faults.py) without changing anything the run computes."""

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        seconds: float = Field(0.1, ge=0, description="Sleep after each iteration, in seconds.")

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()

    def after_iteration(self, run, record):
        time.sleep(self.config.seconds)


class ShiftPolicy(nn.Module):
    """``v(x, sigma) = theta`` everywhere; the reference model has ``theta = 0``. Records the ``cfg_grad`` of each
    ``loss_forward()``. Every quantity of the loss is a closed form of ``theta`` (tests/test_recipe_fidelity.py,
    tests/test_step_controls.py)."""

    def __init__(self, theta: float, shape=(1, 2, 2)):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(float(theta)))
        self.device = torch.device("cpu")
        self.latent_shape = shape
        self._reference = False
        self.cfg_grads: list[str] = []

    def velocity(self, x, sigma, cond):
        return torch.zeros_like(x) + (0.0 * self.theta if self._reference else self.theta)

    def encode(self, prompts):
        return Cond(prompt_embeds=torch.zeros(len(prompts), 1, 1), prompts=list(prompts))

    def trainable_parameters(self):
        return [self.theta]

    @contextmanager
    def reference(self):
        self._reference = True
        try:
            yield self
        finally:
            self._reference = False

    @contextmanager
    def loss_forward(self, cfg_grad="conditional"):
        self.cfg_grads.append(cfg_grad)
        yield


class LinearSampler:
    """``log_prob = theta * c`` and ``mean = theta * m``, with ``c = latents[:, k]`` and
    ``m = latents[:, k + 1]`` (scalars per row), ``theta = 0`` in the reference."""

    def log_prob(self, policy, traj, step):
        theta = 0.0 * policy.theta if policy._reference else policy.theta
        return theta * traj.latents[:, step].flatten(1)[:, 0], theta * traj.latents[:, step + 1]

    def rollout(self, *args, **kwargs):
        raise NotImplementedError
