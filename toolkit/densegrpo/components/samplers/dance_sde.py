"""DanceGRPO's SDE sampler: a constant noise coefficient eta per step (method.md section 1)."""

from __future__ import annotations

import math

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from densegrpo.components.samplers._gaussian import (
    check_grid,
    dance_sde_mean,
    gaussian_rollout,
    gaussian_step_log_prob,
)
from densegrpo.contracts.protocols import Cond, Policy, Trajectory


def dance_sde_step_std(sigmas: Tensor, noise_level: Tensor) -> Tensor:
    """``(T,)`` transition std ``eta_k * sqrt(-dt_k)`` of every step (DanceGRPO's ``std_dev_t``)."""
    grid = sigmas.to(torch.float32).tolist()
    levels = noise_level.to(torch.float32).tolist()
    return torch.tensor([eta * math.sqrt(grid[k] - grid[k + 1]) for k, eta in enumerate(levels)], dtype=torch.float32)


class DanceSDESampler:
    """DanceGRPO's stochastic sampler (Xue et al., arXiv 2505.07818): the reverse SDE of the flow
    with a noise coefficient that is constant in sigma, one level ``eta_k`` per step.

    Step ``k`` (``sigma = sigmas[k]``, ``dt = sigmas[k+1] - sigma < 0``)::

        std_t  = eta_k                                             # Flow-SDE: a sqrt(sigma / (1 - sigma))
        mean   = x + [v + eta_k^2 / (2 sigma) * (x + (1 - sigma) v)] * dt
        x_next = mean + eta_k * sqrt(-dt) * eps,  eps ~ N(0, I)

    as ``flux_step`` of XueZeyue/DanceGRPO, fastvideo/train_grpo_flux.py lines 131-170 (mean:
    lines 141-153 in its score form, see :func:`~densegrpo.components.samplers._gaussian.dance_sde_mean`;
    ``std_dev_t = eta * sqrt(delta_t)``: line 148; the log-prob, a Gaussian density averaged over
    the non-batch dims: lines 159-167) and Flow-Factory's ``Dance-SDE`` dynamics
    (src/flow_factory/scheduler/flow_match_euler_discrete.py lines 373-398). It is the Flow-SDE
    family (the same score correction, so the same marginals in continuous time) with ``g(t) = eta``:
    more noise than Flow-SDE's at low sigma, less near sigma = 1, and no cap is needed at sigma = 1.
    DanceGRPO trains FLUX with ``eta = 0.3`` (scripts/finetune/finetune_flux_grpo.sh line 46): the
    noise level comes from the calibrator, e.g. ``calibrator: {name: uniform, config:
    {noise_level: 0.3}}``.

    ``log_probs`` are the Gaussian log-density of ``x_next`` averaged over ``C*h*w``, in float32,
    as for every built-in sampler. ``eta_k = 0`` is the Euler ODE step, not trained. Every step is
    stochastic for ``eta_k > 0``, the last (to sigma = 0) included.
    """

    class Config(BaseModel):
        """The Dance-SDE sampler has no options: its eta is the run's noise level."""

        model_config = ConfigDict(extra="forbid")

    sde_mean = staticmethod(dance_sde_mean)
    """The stochastic steps' mean function (a module-level function of ``_gaussian``)."""

    noise_level_range = (0.0, math.inf)
    """Any ``eta >= 0``: the std grows with eta without bound, and no level folds back (unlike cps)."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()

    def rollout(
        self,
        policy: Policy,
        cond: Cond,
        noise: Tensor,
        sigmas: Tensor,
        noise_level: Tensor,
        *,
        step_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Trajectory:
        """Sample from ``noise (N,C,h,w)`` along ``sigmas (T+1,)`` with ``noise_level (T,)`` (eta per step)."""
        check_grid(sigmas, noise_level)
        step_std = dance_sde_step_std(sigmas, noise_level)
        # std_t = eta, the coefficient without sqrt(-dt) that Flow-GRPO's KL form divides by
        std_t = torch.where(step_std > 0, noise_level.to(torch.float32).cpu(), torch.zeros_like(step_std))
        return gaussian_rollout(
            policy, cond, noise, sigmas, noise_level, step_std, self.sde_mean,
            step_noise=step_noise, generator=generator, std_t=std_t,
        )

    def log_prob(self, policy: Policy, traj: Trajectory, step: int) -> tuple[Tensor, Tensor]:
        """Step ``k``'s ``(log_prob (N,), mean (N,C,h,w))`` recomputed with gradients."""
        return gaussian_step_log_prob(policy, traj, step, self.sde_mean)
