"""Deterministic Euler sampler of the flow ODE (method.md section 1)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from densegrpo.components.samplers._gaussian import (
    check_grid,
    euler_mean,
    gaussian_rollout,
    gaussian_step_log_prob,
)
from densegrpo.contracts.protocols import Cond, Policy, Trajectory


def _euler_as_sde_mean(x, v, sigma, sigma_next, noise_level, cap):  # never stochastic
    return euler_mean(x, v, sigma, sigma_next)


class ODESampler:
    """Euler steps ``x_{k+1} = x_k + v_theta(x_k, sigma_k) * (sigma_{k+1} - sigma_k)``.

    Every step is deterministic: ``log_probs`` and ``step_std`` are 0, no step is trained,
    and ``noise_level`` is recorded as zeros whatever is passed. Used for evaluation (40
    steps in Flow-GRPO) and as the reference the stochastic samplers reduce to at ``a = 0``.
    """

    class Config(BaseModel):
        """The ODE sampler has no options."""

        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def rollout(
        self,
        policy: Policy,
        cond: Cond,
        noise: Tensor,
        sigmas: Tensor,
        noise_level: Tensor | None = None,
        *,
        step_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Trajectory:
        """Integrate from ``noise (N,C,h,w)`` along ``sigmas (T+1,)``; see the Sampler protocol."""
        check_grid(sigmas)
        zeros = torch.zeros(sigmas.numel() - 1, dtype=torch.float32)
        return gaussian_rollout(
            policy, cond, noise, sigmas, zeros, zeros, _euler_as_sde_mean,
            step_noise=None, generator=None,
        )

    def log_prob(self, policy: Policy, traj: Trajectory, step: int) -> tuple[Tensor, Tensor]:
        """``(zeros (N,), Euler mean (N,C,h,w))`` with gradients through the mean."""
        return gaussian_step_log_prob(policy, traj, step, _euler_as_sde_mean)
