"""HPS v2.1 reward (Human Preference Score v2.1, Wu et al., 2023) on hpsv2x."""

from __future__ import annotations

from pydantic import Field

from densegrpo_hps.hpsv2 import HPSv2Reward


class HPSv21Reward(HPSv2Reward):
    """HPS v2.1: the same model and score as :class:`HPSv2Reward` with the v2.1 weights.

    ``diag(image_features @ text_features.T)`` of open_clip ViT-H-14 (method.md section 5), with
    the ``HPS_v2.1_compressed.pt`` state dict from ``xswu/HPSv2``.
    """

    version = "v2.1"

    class Config(HPSv2Reward.Config):
        checkpoint_filename: str = Field("HPS_v2.1_compressed.pt", description="File name of the HPS v2.1 checkpoint in the repo or folder.")
