"""PickScore reward (Kirstain et al., 2023), as Flow-GRPO and DenseGRPO train with it."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo_pickscore._clip import CLIPPairScorer, Dtype, PreprocessMode, build_scorer


class PickScoreReward:
    """PickScore: ``logit_scale.exp() * cos(text, image) / divisor`` (method.md section 5).

    The CLIP-H processor (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``) tokenises the prompt and
    sets the image preprocessing, which runs in torch on the batch (shortest-edge bicubic
    resize, center crop, CLIP normalisation). The model is ``yuvalkirstain/PickScore_v1``.

    Call: ``images (N,3,H,W)`` float32 in [0,1], ``N`` prompts -> ``(N,)`` float32.

    Build it offline from in-memory modules with ``PickScoreReward(config, model=..., processor=...)``
    (a transformers ``CLIPModel`` and ``CLIPProcessor``).
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
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
            what="PickScore",
            device=self.config.device,
            dtype=self.config.dtype,
            divisor=self.config.divisor,
            batch_size=self.config.batch_size,
            offline=self.config.offline,
            mode=self.config.preprocess,
        )

    @classmethod
    def from_modules(cls, model: Any, processor: Any, config: Config | None = None) -> "PickScoreReward":
        """Wrap an in-memory ``CLIPModel`` and ``CLIPProcessor`` (tests, custom checkpoints)."""
        return cls(config, model=model, processor=processor)

    @classmethod
    def contract_instance(cls) -> "PickScoreReward":
        """A tiny random-weight instance for the core contract tests (offline, CPU)."""
        from densegrpo_pickscore.testing import tiny_pickscore

        return tiny_pickscore()

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Like ``__call__`` but keeps gradients: ``(N,3,H,W)``, ``N`` prompts -> ``(N,)``."""
        return self.scorer.score(images, prompts)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] -> ``(N,)`` float32 PickScores."""
        with torch.no_grad():
            return self.scorer.score(images, prompts)
