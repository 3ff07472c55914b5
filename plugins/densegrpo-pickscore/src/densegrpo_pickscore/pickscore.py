"""PickScore reward (Kirstain et al., 2023), as Flow-GRPO and DenseGRPO train with it."""

from __future__ import annotations

from pydantic import Field

from densegrpo_pickscore._clip import CLIPPairReward, CLIPRewardConfig


class PickScoreReward(CLIPPairReward):
    """PickScore: ``logit_scale.exp() * cos(text, image) / divisor`` (method.md section 5).

    The CLIP-H processor (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) tokenises the prompt and
    sets the image preprocessing, which runs in torch on the batch (shortest-edge bicubic
    resize, center crop, CLIP normalisation). The model is ``yuvalkirstain/PickScore_v1``.

    Call: ``images (N,3,H,W)`` float32 in [0,1], ``N`` prompts -> ``(N,)`` float32.

    Build it offline from in-memory modules with ``PickScoreReward(config, model=..., processor=...)``
    (a transformers ``CLIPModel`` and ``CLIPProcessor``).
    """

    class Config(CLIPRewardConfig):
        model: str = Field(
            "yuvalkirstain/PickScore_v1",
            description="CLIPModel weights: hub id or local folder (PickScore, Kirstain et al. 2023).",
        )
        processor: str = Field(
            "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            description="CLIPProcessor (tokenizer and image settings): hub id or local folder, as PickScore's reference code.",
        )
        divisor: float = Field(
            1.0, gt=0, description="The score is divided by this; Flow-GRPO trains with 26 (pickscore_scorer.py)."
        )

    what = "PickScore"

    @classmethod
    def contract_instance(cls) -> "PickScoreReward":
        """A tiny random-weight instance for the core contract tests (offline, CPU)."""
        from densegrpo_pickscore.testing import tiny_pickscore

        return tiny_pickscore()
