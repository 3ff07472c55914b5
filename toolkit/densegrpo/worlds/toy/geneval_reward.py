"""The toy world's GenEval reward: program detector + GenEval's scoring rules."""

from __future__ import annotations

import json
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo.worlds import geneval_rules
from densegrpo.worlds.geneval_rules import Detection
from densegrpo.worlds.toy.detector import ToyDetector


class ToyGenEvalReward:
    """GenEval on toy scenes: :class:`~densegrpo.worlds.toy.detector.ToyDetector` finds shapes and
    colours, :mod:`densegrpo.worlds.geneval_rules` scores them against the prompt's GenEval metadata
    (method.md, section 5), exactly as the GenEval plugin scores Mask2Former detections.

    Call: ``images (N,3,H,W)`` float32 in [0,1] (any ``H, W >= 32``, resized internally),
    ``N`` prompts, ``N`` metadata dicts in GenEval's format -> ``(N,)`` float32. A sample whose
    metadata is ``None`` or has no ``"include"`` list scores NaN ("not applicable").
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        mode: Literal["partial", "strict", "correct"] = Field(
            "partial",
            description="'partial': mean per-clause partial credit in [0,1] (the training reward, Flow-GRPO); "
            "'strict': 1 if every clause holds exactly, else 0; 'correct': GenEval's own benchmark rule "
            "(evaluate_images.py), 1 or 0.",
        )
        threshold: float = Field(
            geneval_rules.THRESHOLD, ge=0, le=1, description="Detection confidence threshold (GenEval default 0.3)."
        )
        counting_threshold: float = Field(
            geneval_rules.COUNTING_THRESHOLD,
            ge=0,
            le=1,
            description="Confidence threshold for prompts tagged 'counting' (GenEval default 0.9).",
        )
        max_objects: int = Field(
            geneval_rules.MAX_OBJECTS, ge=1, description="Detections kept per class (GenEval default 16)."
        )
        position_threshold: float = Field(
            geneval_rules.POSITION_THRESHOLD,
            ge=0,
            description="Share of the box sizes ignored when judging relations (GenEval default 0.1).",
        )
        clip_count: bool = Field(
            True,
            description="Clip the partial count credit 1 - |req - found| / req at 0 (Flow-GRPO's server does not).",
        )
        exclude_clauses: bool = Field(
            True, description="Score exclude clauses as 0/1 clauses of the partial reward (Flow-GRPO skips them)."
        )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.detector = ToyDetector()

    def detect(self, images: Tensor) -> list[list[Detection]]:
        """``images (N,3,H,W)`` float in [0,1] -> per image, detections sorted by confidence.

        Boxes are in pixels of the given images.
        """
        return self.detector.detect(images)

    def score_detections(self, metadata: dict[str, Any] | str | None, detections: list[Detection]) -> float:
        """One sample's score under :attr:`Config.mode`; NaN when ``metadata`` is not applicable."""
        if isinstance(metadata, str):
            try:
                metadata = json.loads(metadata)
            except json.JSONDecodeError:
                raise ValueError(
                    f"metadata string is not JSON: {metadata[:60]!r}; pass a GenEval metadata dict"
                ) from None
        if not isinstance(metadata, dict) or not metadata.get("include"):
            return float("nan")
        c = self.config
        common = dict(
            threshold=c.threshold,
            counting_threshold=c.counting_threshold,
            max_objects=c.max_objects,
            position_threshold=c.position_threshold,
        )
        if c.mode == "partial":
            return geneval_rules.partial_score(
                metadata, detections, clip_count=c.clip_count, exclude_clauses=c.exclude_clauses, **common
            )
        if c.mode == "strict":
            return float(geneval_rules.strict_correct(metadata, detections, **common))
        return float(geneval_rules.geneval_correct(metadata, detections, **common))

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] -> ``(N,)`` float32 scores (NaN: no metadata)."""
        count = int(images.shape[0]) if isinstance(images, Tensor) and images.ndim == 4 else -1
        if metadata is None:
            metadata = [None] * max(count, 0)
        if count < 0 or len(metadata) != count or (prompts is not None and len(prompts) != count):
            raise ValueError(
                f"toy-geneval needs images (N,3,H,W) with N prompts and N metadata entries; got images "
                f"{tuple(getattr(images, 'shape', ()))}, {len(prompts or [])} prompts, {len(metadata)} metadata"
            )
        scores = torch.full((count,), float("nan"), dtype=torch.float32)
        applicable = [i for i, m in enumerate(metadata) if m is not None]
        if applicable:
            detections = self.detect(images[applicable])
            for i, dets in zip(applicable, detections):
                scores[i] = self.score_detections(metadata[i], dets)
        return scores.to(images.device)
