"""CLIP pair scoring shared by PickScore and CLIPScore.

Both rewards of this package compute ``logit_scale.exp() * cos(text, image) / divisor``
(method.md section 5) with a transformers ``CLIPModel``; they differ only in their weights
and divisor. Weight loading is ``densegrpo.api``'s hub helpers, the torch preprocessing
``densegrpo.api``'s (``Preprocess``). Nothing here imports transformers at module import time.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, Sequence

import torch
from densegrpo.api import (
    Dtype,
    Preprocess,
    WeightsNotFoundError,
    check_inputs,
    load_pretrained,
    resolve_device,
    resolve_dtype,
)
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

__all__ = [
    "CLIPPairReward", "CLIPPairScorer", "CLIPRewardConfig", "Dtype", "PreprocessMode", "WeightsNotFoundError", "build_scorer"
]

PreprocessMode = Literal["torch", "processor"]


class CLIPPairScorer:
    """``logit_scale.exp() * cos(text_i, image_i) / divisor`` for each pair, in batches.

    Args:
        model: a transformers ``CLIPModel`` (weights already on ``device``/``dtype``).
        tokenizer: its tokenizer (``processor.tokenizer``).
        preprocess: the torch image preprocessing.
        image_processor: the processor's image processor, used when ``mode == "processor"``.
        mode: ``"torch"`` (batched, differentiable) or ``"processor"`` (8-bit images through
            the processor, exactly as the reference code; no gradients).
        divisor: the score is divided by this (Flow-GRPO: 26 for PickScore, 30 for CLIPScore).
        batch_size: pairs per forward pass.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        preprocess: Preprocess,
        divisor: float,
        batch_size: int,
        image_processor: Any = None,
        mode: PreprocessMode = "torch",
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.preprocess = preprocess
        self.image_processor = image_processor
        self.mode = mode
        self.divisor = float(divisor)
        self.batch_size = int(batch_size)
        self.max_length = int(getattr(model.config.text_config, "max_position_embeddings", 77))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def image_embeds(self, images: Tensor) -> Tensor:
        """``(N,3,H,W)`` in [0,1] -> L2-normalised image embeddings ``(N, D)`` float32."""
        if self.mode == "processor":
            # as Flow-GRPO: 8-bit images, then the processor (which resizes the uint8 images)
            u8 = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
            pixels = self.image_processor(images=list(u8), return_tensors="pt")["pixel_values"]
            pixels = pixels.to(device=self.device, dtype=self.dtype)
        else:
            pixels = self.preprocess(images.to(self.device)).to(self.dtype)
        return _normalise(_pooled(self.model.get_image_features(pixel_values=pixels)))

    def text_embeds(self, prompts: Sequence[str]) -> Tensor:
        """``N`` prompts -> L2-normalised text embeddings ``(N, D)`` float32."""
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        ).to(self.device)
        features = self.model.get_text_features(
            input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
        )
        return _normalise(_pooled(features))

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``images (N,3,H,W)``, ``N`` prompts -> ``(N,)`` float32; keeps the autograd graph."""
        check_inputs(images, prompts, need_prompts=True)
        out = []
        scale = self.model.logit_scale.float().exp()
        for start in range(0, images.shape[0], self.batch_size):
            stop = start + self.batch_size
            cos = (self.image_embeds(images[start:stop]) * self.text_embeds(prompts[start:stop])).sum(-1)
            out.append(scale * cos / self.divisor)
        if not out:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        return torch.cat(out).to(device=images.device, dtype=torch.float32)


def _pooled(features: Any) -> Tensor:
    # transformers 5 returns a ModelOutput whose pooler_output is the projected embedding
    return features if isinstance(features, Tensor) else features.pooler_output


def _normalise(features: Tensor) -> Tensor:
    features = features.float()
    return features / features.norm(p=2, dim=-1, keepdim=True)


def build_scorer(
    *,
    model_source: str,
    processor_source: str,
    model: Any | None,
    processor: Any | None,
    what: str,
    device: str | None,
    dtype: str,
    divisor: float,
    batch_size: int,
    offline: bool,
    mode: PreprocessMode = "torch",
) -> CLIPPairScorer:
    """Load (or take) a ``CLIPModel`` and ``CLIPProcessor`` and wrap them in a scorer."""
    if model is None or processor is None:
        from transformers import CLIPModel, CLIPProcessor

        if processor is None:
            processor = load_pretrained(
                CLIPProcessor.from_pretrained, processor_source, what=f"{what} processor", field="processor", offline=offline
            )
        if model is None:
            model = load_pretrained(
                CLIPModel.from_pretrained, model_source, what=f"{what} model", field="model", offline=offline
            )
    model = model.to(device=resolve_device(device), dtype=resolve_dtype(dtype))
    return CLIPPairScorer(
        model,
        processor.tokenizer,
        Preprocess.from_image_processor(processor.image_processor),
        divisor,
        batch_size,
        image_processor=processor.image_processor,
        mode=mode,
    )


class CLIPRewardConfig(BaseModel):
    """The settings PickScore and CLIPScore share; each adds its weights and divisor."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(..., description="CLIPModel weights: hub id or local folder.")
    processor: str = Field(..., description="CLIPProcessor (tokenizer and image settings): hub id or local folder.")
    divisor: float = Field(1.0, gt=0, description="The score is divided by this.")
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


class CLIPPairReward:
    """A reward that is ``logit_scale.exp() * cos(text, image) / divisor`` of a ``CLIPModel``.

    Subclasses set ``Config`` (a :class:`CLIPRewardConfig` with their defaults) and ``what``
    (the name in error messages). Call: ``images (N,3,H,W)`` float32 in [0,1], ``N`` prompts
    -> ``(N,)`` float32.
    """

    Config: ClassVar[type[CLIPRewardConfig]] = CLIPRewardConfig
    what: ClassVar[str] = "CLIP"

    def __init__(self, config: CLIPRewardConfig | None = None, *, model: Any = None, processor: Any = None) -> None:
        self.config = config if config is not None else self.Config()
        self.scorer: CLIPPairScorer = build_scorer(
            model_source=self.config.model,
            processor_source=self.config.processor,
            model=model,
            processor=processor,
            what=self.what,
            device=self.config.device,
            dtype=self.config.dtype,
            divisor=self.config.divisor,
            batch_size=self.config.batch_size,
            offline=self.config.offline,
            mode=self.config.preprocess,
        )

    @classmethod
    def from_modules(cls, model: Any, processor: Any, config: CLIPRewardConfig | None = None) -> Any:
        """Wrap an in-memory ``CLIPModel`` and ``CLIPProcessor`` (tests, custom checkpoints)."""
        return cls(config, model=model, processor=processor)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Like ``__call__`` but keeps gradients: ``(N,3,H,W)``, ``N`` prompts -> ``(N,)``."""
        return self.scorer.score(images, prompts)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] -> ``(N,)`` float32 scores (no gradients)."""
        with torch.no_grad():
            return self.scorer.score(images, prompts)
