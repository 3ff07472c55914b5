"""The toy world's learned image-text reward: a tiny open_clip model scored like PickScore."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo.worlds.toy.clip_model import ToyCLIP


class ToyCLIPReward:
    """PickScore's formula on the shipped toy CLIP: ``logit_scale.exp() * cos(text, image)``.

    The model (:mod:`densegrpo.worlds.toy.clip_model`, an ``open_clip.CLIP`` with a tiny custom
    config) was trained contrastively on toy (render, prompt) pairs by
    ``scripts/train_toy_clip.py``; its weights ship inside the package. It stands in for a
    learned human-preference reward and runs through the same path as the PickScore and HPS
    plugins (method.md, section 5).

    Call: ``images (N,3,H,W)`` float32 in [0,1] (any ``H, W >= 32``, resized to 32 with an
    anti-aliased filter), ``N`` prompts -> ``(N,)`` float32. ``metadata`` is ignored.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        weights: str | None = Field(
            None,
            description="Folder with config.json + model.safetensors; null loads the weights shipped in "
            "densegrpo/worlds/toy/weights/toy_clip (trained by scripts/train_toy_clip.py).",
        )
        divisor: float = Field(
            1.0, gt=0, description="The score is divided by this (Flow-GRPO divides PickScore by 26 for training)."
        )
        device: str = Field("cpu", description="Torch device the model runs on, e.g. 'cpu' or 'cuda'.")
        batch_size: int = Field(512, ge=1, description="Image-prompt pairs per forward pass.")

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()
        try:
            device = torch.device(self.config.device)
        except RuntimeError:
            raise ValueError(f"unknown torch device '{self.config.device}'; use e.g. 'cpu' or 'cuda'") from None
        self.model = ToyCLIP.load(self.config.weights).to(device).eval()
        self.model.requires_grad_(False)
        self._text_cache: dict[str, Tensor] = {}

    def _text_features(self, prompts: list[str]) -> Tensor:
        missing = sorted({p for p in prompts if p not in self._text_cache})
        if missing:
            if len(self._text_cache) + len(missing) > 100_000:  # bound memory for open-ended prompt streams
                self._text_cache.clear()
            features = self.model.text_features(missing)
            self._text_cache.update(zip(missing, features))
        return torch.stack([self._text_cache[p] for p in prompts])

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None] | None = None) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1], ``N`` prompts -> ``(N,)`` float32 scores."""
        if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"toy-clip needs images shaped (N,3,H,W), got {tuple(getattr(images, 'shape', ()))}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"toy-clip needs one prompt per image: got {len(prompts)} prompts for {images.shape[0]} images")
        if min(images.shape[-2:]) < 32:
            raise ValueError(f"toy-clip needs images of at least 32x32 pixels, got {tuple(images.shape[-2:])}")
        scores = []
        with torch.no_grad():
            for start in range(0, len(prompts), self.config.batch_size):
                stop = start + self.config.batch_size
                image = self.model.image_features(images[start:stop])
                text = self._text_features(list(prompts[start:stop]))
                scores.append(self.model.model.logit_scale.exp() * (image * text).sum(-1))
        out = torch.cat(scores) if scores else torch.zeros(0)
        return (out / self.config.divisor).float().to(images.device)
