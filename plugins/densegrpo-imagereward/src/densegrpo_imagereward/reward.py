"""The ``imagereward`` reward: ImageReward-v1.0 (Xu et al., NeurIPS 2023) per (prompt, image) pair.

method.md section 5: "ImageReward: the image-reward package, score(prompt, image) per pair." Each
image is scored against its own prompt (row ``i`` with ``prompts[i]``), never the cross product.
The forward pass is upstream's own batched ``ImageReward.score_gard`` (BLIP ViT-L image tokens,
cross-attended by the BERT text encoder, ``[CLS]`` feature -> MLP -> ``(r - mean) / std``).
"""

from __future__ import annotations

import os
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

IMAGE_SIZE = 224
"""ImageReward's input size (``ImageReward._transform(224)``)."""
MAX_PROMPT_TOKENS = 35
"""Upstream tokenises with ``padding="max_length", truncation=True, max_length=35``."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def preprocess(images: Tensor, size: int = IMAGE_SIZE) -> Tensor:
    """Upstream's ``_transform`` on tensors: ``(N,3,H,W)`` in [0,1] -> ``(N,3,size,size)`` normalised.

    Resize (shorter side to ``size``, bicubic) -> centre crop -> CLIP normalisation. Upstream resizes
    PIL images; torch's antialiased bicubic is close but not bit-equal, so images already at
    ``size`` skip the resize, as torchvision's own ``Resize`` does, and match upstream exactly.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as F

    x = images.float()
    if min(x.shape[-2:]) != size:
        x = F.resize(x, size, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0.0, 1.0)
    x = F.center_crop(x, [size, size])
    return F.normalize(x, CLIP_MEAN, CLIP_STD)


class ImageRewardReward:
    """ImageReward-v1.0 human-preference score of each (prompt, image) pair.

    ``__call__(images (N,3,H,W) float32 in [0,1], prompts (N,), metadata) -> (N,) float32``; the
    score is upstream's standardised reward (about N(0, 1) over its training prompts).
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        model_path: str = Field(
            "THUDM/ImageReward",
            description="Hub repo id, or a local folder holding ImageReward.pt (or ImageReward.safetensors) "
            "and med_config.json, or the checkpoint file itself (Xu et al. 2023, ImageReward-v1.0).",
        )
        tokenizer_path: str = Field(
            "bert-base-uncased",
            description="Hub id or local folder of the BERT tokenizer ImageReward uses (BLIP's init_tokenizer).",
        )
        device: str = Field("cpu", description="Torch device the model runs on, e.g. 'cpu' or 'cuda'.")
        dtype: Literal["float32", "float16", "bfloat16"] = Field(
            "float32", description="Weights and activation dtype; scores are returned as float32."
        )
        batch_size: int = Field(16, ge=1, description="Pairs scored per forward pass.")

    def __init__(self, config: Config | None = None, *, model: Any | None = None) -> None:
        self.config = config or self.Config()
        if model is None:
            os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
            from densegrpo_imagereward.model import load_pretrained

            model = load_pretrained(self.config.model_path, self.config.tokenizer_path)
        self.device = torch.device(self.config.device)
        self.dtype = DTYPES[self.config.dtype]
        self.model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.model.device = self.device  # upstream builds its image mask on ``self.device``
        self.tokenizer = self.model.blip.tokenizer

    @classmethod
    def from_modules(cls, model: Any, config: Config | dict[str, Any] | None = None) -> "ImageRewardReward":
        """Wrap an already built upstream ``ImageReward`` module (no weights are read)."""
        if isinstance(config, dict):
            config = cls.Config.model_validate(config)
        return cls(config, model=model)

    @classmethod
    def tiny(cls, seed: int = 0, **config: Any) -> "ImageRewardReward":
        """A tiny random ImageReward (1-block ViT, 1-layer BERT), built offline in about a second."""
        from densegrpo_imagereward.model import tiny_upstream

        return cls.from_modules(tiny_upstream(seed), config)

    @classmethod
    def contract_instance(cls) -> "ImageRewardReward":
        """The instance densegrpo's contract tests use (tiny, random, offline)."""
        return cls.tiny()

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None] | None = None) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1], ``prompts`` (N,) -> rewards ``(N,)`` float32."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(
                f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image"
            )
        scores = []
        for start in range(0, len(prompts), self.config.batch_size):
            stop = start + self.config.batch_size
            pixels = preprocess(images[start:stop]).to(device=self.device, dtype=self.dtype)
            text = self.tokenizer(
                list(prompts[start:stop]),
                padding="max_length",
                truncation=True,
                max_length=MAX_PROMPT_TOKENS,
                return_tensors="pt",
            ).to(self.device)
            rewards = self.model.score_gard(text.input_ids, text.attention_mask, pixels)  # (n, 1)
            scores.append(rewards.reshape(-1).float().cpu())
        return torch.cat(scores) if scores else torch.zeros(0)
