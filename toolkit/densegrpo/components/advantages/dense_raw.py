"""The "dense reward baseline" of DenseGRPO's ablation: R_{t-1} itself as the step reward.

method.md section 3 (ablations): instead of the gain ``R_{t-1} - R_t``, step ``t`` (the
move ``x_t -> x_{t-1}``) is credited with ``R_{t-1}``, the reward of the clean estimate of
the state it reached, normalised per timestep across each group:
    A_t^i = (R_{t-1}^i - mean_group(R_{t-1})) / (std_group(R_{t-1}) + 1e-4)
The paper found it better than sparse and worse than the gain. The last step (``t = 1``)
sees ``R_0``, the terminal reward, so its column equals the sparse advantage with group std.
"""

from __future__ import annotations

import torch
from torch import Tensor

from densegrpo.components.advantages._normalize import (
    check_batch,
    group_normalize,
    summarize,
)
from densegrpo.components.advantages.dense import DenseEstimatorConfig
from densegrpo.contracts.protocols import DenseRewards, RewardBatch, RewardNeeds


class DenseRawAdvantage:
    """Per-timestep group-normalised latent reward ``R_{t-1}`` (DenseGRPO's dense baseline).

    Input: ``RewardBatch.dense (N, T+1)``, papers' order. Output: advantages ``(N, T)``
    float32; column ``k`` normalises ``R_{t-1}`` with ``t = T - k``, i.e. the reward of
    ``x_{k+1}``, the state step ``k`` reaches. ``R_T`` (pure noise's ODE sample) is unused.

    ``last_stats``: ``nan_rewards`` (NaN entries of ``dense``), ``nan_advantages``,
    ``zero_std_ratio`` (share of (group, timestep) cells), ``advantage_abs_mean``.
    """

    class Config(DenseEstimatorConfig):
        """Options of the dense-raw estimator."""

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.needs = RewardNeeds(dense=True, completion=self.config.completion, step_local=True)
        self.last_stats: dict[str, float] = {}

    def __call__(self, rewards: RewardBatch) -> Tensor:
        """``rewards.dense (N, T+1)`` -> advantages ``(N, T)`` float32."""
        check_batch(rewards, dense=True, estimator="dense-raw advantage")
        assert rewards.dense is not None
        by_step = DenseRewards(rewards.dense.to(torch.float32)).by_step_index()  # [:, k] = R_{T-k}
        reached = by_step[:, 1:]  # [:, k] = R_{t-1}, the reward of x_{k+1}
        advantages, stats = group_normalize(reached, rewards.group_size, "group")
        # only R_0 .. R_{T-1} enter; count the NaNs the estimator actually saw
        self.last_stats = summarize(advantages, stats, nan_rewards=stats.invalid)
        return advantages
