"""Tiny colour rewards for the monitor tests: one pays for red only, one for blue only."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from torch import Tensor


class ColourShare:
    """How much one colour channel ``channel`` exceeds the mean of the other two, per image:
    ``images (N,3,H,W)`` -> ``(N,)``. Paid for one colour only, it is a reward made to be hacked."""

    channel = 0

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()

    def __call__(self, images: Tensor, prompts: list[str], metadata: list) -> Tensor:
        others = [c for c in range(3) if c != self.channel]
        return (images[:, self.channel] - images[:, others].mean(dim=1)).mean(dim=(1, 2)).float()


class RedShare(ColourShare):
    """Pays for red only."""

    channel = 0


class BlueShare(ColourShare):
    """Pays for blue only."""

    channel = 2
