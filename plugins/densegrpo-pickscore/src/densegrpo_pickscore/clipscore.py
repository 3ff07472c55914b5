"""CLIPScore reward: OpenAI CLIP ViT-L/14 image-text similarity, scaled as Flow-GRPO."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo_pickscore._clip import CLIPPairScorer, Dtype, PreprocessMode, build_scorer


class CLIPScoreReward:
    """CLIPScore: ``logit_scale.exp() * cos(text, image) / divisor``, divisor 30 by default.

    Flow-GRPO's ``clip_scorer.py`` returns ``logits_per_image.diagonal() / 30`` with
    ``openai/clip-vit-large-patch14`` (``logit_scale.exp() = 100``), i.e. ``100 cos / 30``.
    Preprocessing runs in torch on the batch with the processor's settings.

    Call: ``images (N,3,H,W)`` float32 in [0,1], ``N`` prompts -> ``(N,)`` float32.

    Build it offline from in-memory modules with ``CLIPScoreReward(config, model=..., processor=...)``.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        model: str = Field(
            "openai/clip-vit-large-patch14",
            description="CLIPModel weights: hub id or local folder (Flow-GRPO clip_scorer.py uses openai/clip-vit-large-patch14).",
        )
        processor: str = Field(
            "openai/clip-vit-large-patch14", description="CLIPProcessor (tokenizer and image settings): hub id or local folder."
        )
        divisor: float = Field(30.0, gt=0, description="The score is divided by this (Flow-GRPO clip_scorer.py: 30).")
        device: str | None = Field(None, description="Torch device; null picks cuda when available, else cpu.")
        dtype: Dtype = Field("float32", description="Model weights dtype; scores are returned as float32.")
        batch_size: int = Field(32, ge=1, description="Image-prompt pairs per forward pass.")
        preprocess: PreprocessMode = Field(
            "torch",
            description="'torch': resize/crop/normalise the float batch in torch (batched, differentiable); "
            "'processor': 8-bit images through the CLIPProcessor, exactly as the reference code (no gradients).",
        )
        offline: bool = Field(
            False, description="Never contact the hub (HF_HUB_OFFLINE=1 does the same); weights must be cached or local."
        )

    def __init__(self, config: Config | None = None, *, model: Any = None, processor: Any = None) -> None:
        self.config = config if config is not None else self.Config()
        self.scorer: CLIPPairScorer = build_scorer(
            model_source=self.config.model,
            processor_source=self.config.processor,
            model=model,
            processor=processor,
            what="CLIPScore",
            device=self.config.device,
            dtype=self.config.dtype,
            divisor=self.config.divisor,
            batch_size=self.config.batch_size,
            offline=self.config.offline,
            mode=self.config.preprocess,
        )

    @classmethod
    def from_modules(cls, model: Any, processor: Any, config: Config | None = None) -> "CLIPScoreReward":
        """Wrap an in-memory ``CLIPModel`` and ``CLIPProcessor`` (tests, custom checkpoints)."""
        return cls(config, model=model, processor=processor)

    @classmethod
    def contract_instance(cls) -> "CLIPScoreReward":
        """A tiny random-weight instance for the core contract tests (offline, CPU)."""
        from densegrpo_pickscore.testing import tiny_clipscore

        return tiny_clipscore()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Like ``__call__`` but keeps gradients: ``(N,3,H,W)``, ``N`` prompts -> ``(N,)``."""
        return self.scorer.score(images, prompts)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] -> ``(N,)`` float32 CLIPScores."""
        with torch.no_grad():
            return self.scorer.score(images, prompts)
