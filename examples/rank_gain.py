"""A new advantage estimator in a few lines: DenseGRPO's step gains, ranked within each group."""

from __future__ import annotations

import torch
from pydantic import BaseModel
from torch import Tensor

from densegrpo.api import DenseRewards, RewardBatch, RewardNeeds


class RankGainAdvantage:
    """Each step's reward gain ``R_{t-1} - R_t``, replaced by its rank within the group and
    scaled to [-1, 1], so one outlier gain weighs no more than any other.

    ``rewards.dense (N, T+1)`` -> advantages ``(N, T)`` float32 (NaN where a gain is NaN).
    """

    class Config(BaseModel):
        """No options."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        # every state's R_t, each completed by the ODE to the end; a step reads only its own two states
        self.needs = RewardNeeds(dense=True, step_local=True)

    def __call__(self, rewards: RewardBatch) -> Tensor:
        gains = DenseRewards(rewards.dense.float()).gains()  # (N, T)
        groups = gains.reshape(-1, rewards.group_size, rewards.num_steps)  # (groups, G, T)
        ranks = groups.nan_to_num(float("-inf")).argsort(1).argsort(1).float()  # 0 .. G-1 within each group
        advantages = (2 * ranks / max(rewards.group_size - 1, 1) - 1).reshape_as(gains)
        return torch.where(gains.isnan(), float("nan"), advantages)
