"""Flow-SDE with exploration noise confined to coarse, block-constant images (method.md section 1)."""

from __future__ import annotations

from functools import partial

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo.components.samplers._gaussian import (
    block_expected_log_ratio,
    block_flow_sde_mean,
    check_grid,
    gaussian_rollout,
    gaussian_step_log_prob,
)
from densegrpo.components.samplers.flow_sde import flow_sde_std_t, flow_sde_step_std
from densegrpo.contracts.protocols import Cond, Policy, Trajectory


class CoarseSDESampler:
    """Flow-GRPO's SDE whose noise is constant over ``block x block`` latent squares.

    Step ``k`` (``P``: projection onto block-constant images, ``d = std_t^2 / (2 sigma)``)::

        std_t  = a_k * sqrt(sigma / (1 - sigma))                  # as flow-sde
        mean   = x + v dt + d dt P (x + (1 - sigma) v)             # score correction where the noise acts
        x_next = mean + std_t * sqrt(-dt) * P eps,  eps ~ N(0, I)

    The transition is a Gaussian on the ``d = C (h / block) (w / block)``-dim affine subspace
    ``mean + range(P)``, and ``log_probs`` are its log-density in the subspace coordinates
    ``U^T x`` averaged over those ``d`` dims. It keeps the flow's marginals in continuous
    time, as flow-sde does (tests/test_samplers.py checks both on Gaussian data).

    Why. A policy-gradient sample contributes ``A * J^T P eps / std``: every noise dimension
    the reward does not depend on adds variance to the gradient and nothing to its mean. The
    toy reward reads object colour, shape, count and position, which live at low spatial
    frequencies, so block 2 removes three quarters of the noise dimensions (768 -> 192 on the
    16 px toy) while keeping the directions the reward responds to. The policy's mean moves
    in the full space; the KL term of the loop still compares the full means (isotropic
    Gaussians of the same std), so the unexplored directions are held to the reference.
    ``block = 1`` is flow-sde.
    """

    class Config(BaseModel):
        """Options of the coarse-noise SDE sampler."""

        model_config = ConfigDict(extra="forbid")
        block: int = Field(
            2, ge=1, description="Side of the latent squares over which the exploration noise is constant "
            "(must divide the latent's height and width); 1 is flow-sde's isotropic noise."
        )
        deterministic_last_step: bool = Field(
            False, description="Make the final step (sigma_next = 0) an Euler ODE step with no log-prob, as in flow-sde."
        )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.sde_mean = partial(block_flow_sde_mean, block=self.config.block)
        # RatioNorm's centring must use the density the log-probs use: the subspace coordinates'
        self.expected_log_ratio = partial(block_expected_log_ratio, block=self.config.block)

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
        """Sample from ``noise (N,C,h,w)`` along ``sigmas (T+1,)`` with ``noise_level (T,)``;
        ``step_noise (N,T,C,h,w)``, if given, is projected by ``P``."""
        check_grid(sigmas, noise_level)
        last = self.config.deterministic_last_step
        step_std = flow_sde_step_std(sigmas, noise_level, last)
        return gaussian_rollout(
            policy, cond, noise, sigmas, noise_level, step_std, self.sde_mean,
            step_noise=step_noise, generator=generator, noise_block=self.config.block,
            std_t=flow_sde_std_t(sigmas, noise_level, last),
        )

    def log_prob(self, policy: Policy, traj: Trajectory, step: int) -> tuple[Tensor, Tensor]:
        """Step ``k``'s ``(log_prob (N,), mean (N,C,h,w))`` recomputed with gradients."""
        return gaussian_step_log_prob(policy, traj, step, self.sde_mean, noise_block=self.config.block)
