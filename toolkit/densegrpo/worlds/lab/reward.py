"""``lab``: the credit-assignment lab's analytic reward, decided at a chosen stage of denoising."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo.worlds.lab import world


class LabReward:
    """The mean over coordinates of ``P(s_stage,j = tau_j | x0_j)``: how surely each coordinate's
    choice at level ``stage`` matches the prompt's pattern, under the lab's data model.

    ``stage`` 0 is the coarse choice, buried in noise above ``t = 0.67``; 2 the detail, decided
    below ``t = 0.11`` (:func:`densegrpo.worlds.lab.world.decision_time`). The base policy scores 0.5 in
    expectation; a policy that always makes the pattern's choice scores 1.

    Call: ``images (N,3,1,d)`` as the ``lab`` policy decodes them, ``N`` prompts ``"pattern k"``
    -> ``(N,)`` float32 in [0, 1]. Metadata is not read.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        stage: int = Field(
            1, ge=0, le=len(world.AMPLITUDES) - 1,
            description="Level whose choice is rewarded: 0 coarse (decided at high noise, t ~ 0.67), 1 middle (t ~ 0.33), "
            "2 detail (low noise, t ~ 0.11).",
        )

    def __init__(self, config: Config | None = None):
        self.config = config if config is not None else self.Config()

    @classmethod
    def contract_batch(cls) -> tuple[Tensor, list[str], None]:
        """What the registry-wide contract test scores: two random lab images ``(2,3,1,16)``, two patterns."""
        x0 = torch.randn(2, 1, 1, 16, generator=torch.Generator().manual_seed(0))
        return world.encode_image(x0), ["pattern 0", "pattern 1"], None

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None] | None = None) -> Tensor:
        """``images (N,3,1,d)`` in [0,1] -> ``(N,)`` float32."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != 1:
            raise ValueError(f"the lab reward scores images (N,3,1,d) decoded by the lab policy, got {tuple(getattr(images, 'shape', ()))}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"the lab reward needs one prompt per image; got {images.shape[0]} images and {len(prompts)} prompts")
        x0 = world.decode_image(images)
        dim = x0.shape[1]
        targets = torch.stack([world.pattern_signs(p, dim) for p in prompts]).to(x0.device) if prompts else x0
        plus = world.choice_posterior(x0, self.config.stage)
        match = torch.where(targets > 0, plus, 1.0 - plus)
        return match.mean(1).float().cpu()


__all__ = ["LabReward"]
