"""DenseGRPO's advantage: the step gain dR_t = R_{t-1} - R_t, normalised per timestep.

method.md section 3:
    dR_t^i = R_{t-1}^i - R_t^i                       (reward gain of the move x_t -> x_{t-1})
    A_t^i  = (dR_t^i - mean_group(dR_t)) / (std_group(dR_t) + 1e-4)
With ``center: false`` the group mean is not subtracted: ``A_t^i = dR_t^i / (std_group(dR_t) + 1e-4)``.
No discount and no return-to-go (those are ``dense-return``). ``sum_t dR_t = R_0 - R_T``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import Tensor

from densegrpo.components.advantages._normalize import (
    canonical_completion,
    check_batch,
    dense_gains,
    group_normalize,
    summarize,
)
from densegrpo.contracts.protocols import RewardBatch, RewardNeeds

COMPLETION_HELP = (
    "ODE steps n that complete x_t into the clean estimate scored as R_t: 't' (all remaining steps, "
    "DenseGRPO's choice and its best ablation), an integer k (min(k, t) steps; the paper's n = 1 is worse "
    "than sparse) or 't/C' (ceil(t / C) steps)."
)


class DenseEstimatorConfig(BaseModel):
    """Options shared by the dense estimators (dense, dense-raw, dense-return)."""

    model_config = ConfigDict(extra="forbid")

    completion: int | str = Field("t", description=COMPLETION_HELP)

    @field_validator("completion", mode="before")
    @classmethod
    def _completion(cls, value: object) -> int | str:
        return canonical_completion(value)


class DenseAdvantage:
    """Per-timestep group-normalised reward gains (DenseGRPO).

    Input: ``RewardBatch.dense (N, T+1)`` in the papers' order (``dense[:, t] = R_t``).
    Output: advantages ``(N, T)`` float32 aligned with the step index ``k``; column ``k``
    normalises the gain ``R_{t-1} - R_t`` (``t = T - k``) of the move ``x_k -> x_{k+1}``
    across each prompt group. A gain touching a NaN reward gets advantage 0.

    ``last_stats``: ``nan_rewards`` (NaN entries of ``dense``), ``nan_advantages``,
    ``zero_std_ratio`` (share of (group, timestep) cells with zero variance),
    ``advantage_abs_mean``.
    """

    class Config(DenseEstimatorConfig):
        """Options of the dense estimator."""

        center: bool = Field(
            True,
            description="Subtract the group mean of the gains (DenseGRPO). False: A = dR / std_group(dR), the gain "
            "keeping only its own baseline R_t (the completion of x_t), so a step that changed nothing gets 0.",
        )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.needs = RewardNeeds(dense=True, completion=self.config.completion, step_local=True)
        self.last_stats: dict[str, float] = {}

    def __call__(self, rewards: RewardBatch) -> Tensor:
        """``rewards.dense (N, T+1)`` -> advantages ``(N, T)`` float32 (method.md section 3)."""
        check_batch(rewards, dense=True, estimator="dense advantage")
        assert rewards.dense is not None
        gains = dense_gains(rewards)  # (N, T), step-aligned
        advantages, stats = group_normalize(gains, rewards.group_size, "group", center=self.config.center)
        nan_rewards = int((~torch.isfinite(rewards.dense)).sum())
        self.last_stats = summarize(advantages, stats, nan_rewards=nan_rewards)
        return advantages
