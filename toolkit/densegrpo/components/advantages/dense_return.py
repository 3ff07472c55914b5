"""Reward-to-go of the dense gains, normalised per timestep (a reviewers' request to DenseGRPO).

Not in the papers (method.md section 3: "no discount, no return-to-go in the paper"). With
step-aligned gains ``dR_k`` (step ``k`` is the move ``x_k -> x_{k+1}``):
    G_k   = sum_{j = k}^{T-1} gamma^(j-k) * dR_j          (the current gain and all later ones)
    A_k^i = (G_k^i - mean_group(G_k)) / (std_group(G_k) + 1e-4)
``gamma = 0`` is DenseGRPO's gain (``dense``). ``gamma = 1`` telescopes to ``G_k = R_0 - R_t``
(``t = T - k``): the terminal reward minus the reward of the state the step starts from.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor

from densegrpo.components.advantages._normalize import (
    check_batch,
    dense_gains,
    group_normalize,
    summarize,
)
from densegrpo.components.advantages.dense import DenseEstimatorConfig
from densegrpo.contracts.protocols import RewardBatch, RewardNeeds


def discounted_reward_to_go(gains: Tensor, gamma: float) -> Tensor:
    """``gains (N, T)`` step-aligned -> ``G (N, T)``, ``G_k = dR_k + gamma * G_{k+1}``, float64.

    A NaN gain makes the returns of its own and every earlier step NaN.
    """
    returns = torch.zeros_like(gains, dtype=torch.float64)
    running = torch.zeros(gains.shape[0], dtype=torch.float64, device=gains.device)
    for k in range(gains.shape[1] - 1, -1, -1):
        running = gains[:, k].to(torch.float64) + gamma * running
        returns[:, k] = running
    return returns


class DenseReturnAdvantage:
    """Per-timestep group-normalised discounted reward-to-go of the dense gains.

    Input: ``RewardBatch.dense (N, T+1)``, papers' order. Output: advantages ``(N, T)``
    float32 aligned with step ``k``.

    ``last_stats``: ``nan_rewards`` (NaN entries of ``dense``), ``nan_advantages``,
    ``zero_std_ratio`` (share of (group, timestep) cells), ``advantage_abs_mean``.
    """

    class Config(DenseEstimatorConfig):
        """Options of the dense-return estimator."""

        gamma: float = Field(
            1.0,
            ge=0.0,
            le=1.0,
            description="Discount of later gains. 1.0 (default) gives G_k = R_0 - R_t: the terminal reward, "
            "the quantity both papers optimise, minus R_t, which depends only on the state before step k and "
            "so acts as a per-state baseline that does not bias the policy gradient. gamma < 1 weights the "
            "step's own gain more (biased towards the immediate effect); 0 is DenseGRPO's gain. Not in the papers.",
        )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.needs = RewardNeeds(dense=True, completion=self.config.completion)
        self.last_stats: dict[str, float] = {}

    def __call__(self, rewards: RewardBatch) -> Tensor:
        """``rewards.dense (N, T+1)`` -> advantages ``(N, T)`` float32."""
        check_batch(rewards, dense=True, estimator="dense-return advantage")
        assert rewards.dense is not None
        returns = discounted_reward_to_go(dense_gains(rewards), self.config.gamma)
        advantages, stats = group_normalize(returns, rewards.group_size, "group")
        nan_rewards = int((~torch.isfinite(rewards.dense)).sum())
        self.last_stats = summarize(advantages, stats, nan_rewards=nan_rewards)
        return advantages
