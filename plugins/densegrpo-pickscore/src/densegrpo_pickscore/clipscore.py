"""CLIPScore reward: OpenAI CLIP ViT-L/14 image-text similarity, scaled as Flow-GRPO."""

from __future__ import annotations

from pydantic import Field

from densegrpo_pickscore._clip import CLIPPairReward, CLIPRewardConfig


class CLIPScoreReward(CLIPPairReward):
    """CLIPScore: ``logit_scale.exp() * cos(text, image) / divisor``, divisor 30 by default.

    Flow-GRPO's ``clip_scorer.py`` returns ``logits_per_image.diagonal() / 30`` with
    ``openai/clip-vit-large-patch14`` (``logit_scale.exp() = 100``), i.e. ``100 cos / 30``.
    Preprocessing runs in torch on the batch with the processor's settings.

    Call: ``images (N,3,H,W)`` float32 in [0,1], ``N`` prompts -> ``(N,)`` float32.

    Build it offline from in-memory modules with ``CLIPScoreReward(config, model=..., processor=...)``.
    """

    class Config(CLIPRewardConfig):
        model: str = Field(
            "openai/clip-vit-large-patch14",
            description="CLIPModel weights: hub id or local folder (Flow-GRPO clip_scorer.py uses openai/clip-vit-large-patch14).",
        )
        processor: str = Field(
            "openai/clip-vit-large-patch14", description="CLIPProcessor (tokenizer and image settings): hub id or local folder."
        )
        divisor: float = Field(30.0, gt=0, description="The score is divided by this (Flow-GRPO clip_scorer.py: 30).")

    what = "CLIPScore"

    @classmethod
    def contract_instance(cls) -> "CLIPScoreReward":
        """A tiny random-weight instance for the core contract tests (offline, CPU)."""
        from densegrpo_pickscore.testing import tiny_clipscore

        return tiny_clipscore()
