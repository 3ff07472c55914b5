"""Scores decoded images of a batch with the run's weighted rewards."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from densegrpo.build import WeightedReward


class RewardScorer:
    """Binds each image to its sample's prompt and metadata and scores it with every reward.

    ``scorer(images (M,3,H,W), rows (M,))`` returns the raw scores ``(M, R)``, one column per
    reward, in the order of ``rewards``; :meth:`combine` turns them into the weighted sum
    (Flow-GRPO's multi-reward). ``rows[j]`` is the sample image ``j`` belongs to. NaN from a
    reward stays NaN ("not applicable"). ``calls`` counts the images scored.
    """

    def __init__(self, rewards: list[WeightedReward], prompts: list[str], metadata: list[dict[str, Any] | None]):
        self.rewards = rewards
        self.prompts = prompts
        self.metadata = metadata
        self.weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
        self.calls = 0

    def __call__(self, images: Tensor, rows: Tensor) -> Tensor:
        """``(M, R)`` raw scores of each reward."""
        index = rows.tolist()
        prompts = [self.prompts[i] for i in index]
        metadata = [self.metadata[i] for i in index]
        self.calls += int(images.shape[0])
        columns = [r.model(images.float(), prompts, metadata).float().reshape(-1).cpu() for r in self.rewards]
        return torch.stack(columns, dim=1)

    def combine(self, raw: Tensor) -> Tensor:
        """Weighted sum over the reward axis ``(..., R) -> (...)``."""
        return (raw * self.weights).sum(dim=-1)

    def weighted(self, images: Tensor, rows: Tensor) -> Tensor:
        """``(M,)``: the weighted sum of the rewards of each image."""
        return self.combine(self(images, rows))
