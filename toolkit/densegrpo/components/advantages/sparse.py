"""Flow-GRPO's sparse advantage: one terminal reward, the same advantage at every step.

method.md section 3:  ``A^i = (R^i - mean_group(R)) / (std + 1e-4)``, broadcast to every step.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo.components.advantages._normalize import (
    check_batch,
    group_normalize,
    summarize,
)
from densegrpo.contracts.protocols import RewardBatch, RewardNeeds


class SparseAdvantage:
    """Group-normalised terminal reward, the same for all ``T`` steps (Flow-GRPO).

    Input: ``RewardBatch.terminal (N,)``; output: advantages ``(N, T)`` float32, row ``i``
    constant. A NaN reward gives that sample advantage 0 at every step.

    After each call ``last_stats`` holds ``nan_rewards``, ``nan_advantages``,
    ``zero_std_ratio`` (share of groups whose rewards are all equal) and
    ``advantage_abs_mean``.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        std: Literal["group", "batch"] = Field(
            "batch",
            description="Divide by the std of the prompt group ('group') or of the whole batch ('batch'). "
            "Flow-GRPO's SD3.5 configs (config/grpo.py: geneval_sd3, general_ocr_sd3, pickscore_sd3) set "
            "global_std = True, i.e. 'batch'; the mean is always the group's.",
        )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.needs = RewardNeeds(dense=False)
        self.last_stats: dict[str, float] = {}

    def __call__(self, rewards: RewardBatch) -> Tensor:
        """``rewards.terminal (N,)`` -> advantages ``(N, T)`` float32 (method.md section 3)."""
        check_batch(rewards, dense=False, estimator="sparse advantage")
        per_sample, stats = group_normalize(rewards.terminal, rewards.group_size, self.config.std)
        advantages = per_sample.unsqueeze(1).expand(-1, rewards.num_steps).contiguous()
        self.last_stats = summarize(advantages, stats, nan_rewards=stats.invalid)
        self.last_stats["nan_advantages"] = float(stats.invalid * rewards.num_steps)
        return advantages.to(device=rewards.terminal.device, dtype=torch.float32)
