"""The ``geneval`` reward: GenEval's detector pipeline scored by the shared rules (method.md section 5).

Per image: Mask2Former instances -> :class:`densegrpo.api.geneval_rules.Detection` (class, box from
the mask, score) -> GenEval's filtering (confidence > 0.3, or 0.9 for ``counting``; at most 16
per class) -> CLIP colours for the classes whose clause asks for one -> the shared rules.
``toy-geneval`` calls the same rules, so toy and real score identically given the same
detections.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Literal

import numpy as np
import torch
from densegrpo.api import geneval_rules as rules
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class GenEvalReward:
    """GenEval score of each image against its GenEval metadata; NaN where there is none.

    ``__call__(images (N,3,H,W) float32 in [0,1], prompts (N,), metadata (N,)) -> (N,) float32``:
    ``partial`` is the mean per-clause partial credit in [0, 1] (Flow-GRPO's training reward),
    ``strict`` and ``correct`` are 0/1 (exact counts; GenEval's benchmark rule).
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        mode: Literal["partial", "strict", "correct"] = Field(
            "partial",
            description="'partial': mean clause credit (Flow-GRPO training reward); 'strict': exact counts, "
            "colours and positions; 'correct': GenEval's own benchmark rule (Ghosh et al. 2023).",
        )
        detector_path: str = Field(
            "facebook/mask2former-swin-small-coco-instance",
            description="Hub id or local folder of a Mask2Former COCO instance-segmentation checkpoint "
            "(GenEval uses Mask2Former Swin-S).",
        )
        clip_model: str = Field("ViT-L-14", description="open_clip architecture of the colour classifier (GenEval: ViT-L-14).")
        clip_pretrained: str = Field(
            "openai", description="open_clip pretrained tag (GenEval: 'openai') or a local checkpoint file."
        )
        clip_quick_gelu: bool = Field(
            True, description="QuickGELU for a local clip_pretrained file (True for OpenAI CLIP weights)."
        )
        metadata_file: str | None = Field(
            None,
            description="GenEval metadata JSONL; rows whose metadata is None are looked up here by prompt.",
        )
        threshold: float = Field(rules.THRESHOLD, ge=0, le=1, description="Detection confidence threshold (GenEval 0.3).")
        counting_threshold: float = Field(
            rules.COUNTING_THRESHOLD, ge=0, le=1, description="Threshold for 'counting' prompts (GenEval 0.9)."
        )
        max_objects: int = Field(rules.MAX_OBJECTS, ge=1, description="Detections kept per class (GenEval 16).")
        position_threshold: float = Field(
            rules.POSITION_THRESHOLD, ge=0, description="Share of box sizes ignored for relations (GenEval 0.1)."
        )
        background: str = Field("#999", description="Colour behind the masked object crop (GenEval 'bgcolor').")
        crop: bool = Field(True, description="Crop the masked object to its box before CLIP (GenEval 'crop').")
        device: str = Field("cpu", description="Torch device for the detector and CLIP.")
        dtype: Literal["float32", "float16", "bfloat16"] = Field("float32", description="Model weights dtype.")
        batch_size: int = Field(4, ge=1, description="Images per detector forward pass.")

    def __init__(self, config: Config | None = None, *, detector: Any | None = None, color_classifier: Any | None = None) -> None:
        self.config = config or self.Config()
        dtype = DTYPES[self.config.dtype]
        if detector is None:
            from densegrpo_geneval.detector import Mask2FormerDetector

            detector = Mask2FormerDetector.from_pretrained(self.config.detector_path, self.config.device, dtype)
        if color_classifier is None:
            from densegrpo_geneval.colors import ColorClassifier

            color_classifier = ColorClassifier.from_pretrained(
                self.config.clip_model,
                self.config.clip_pretrained,
                self.config.clip_quick_gelu,
                self.config.device,
                dtype,
                background=self.config.background,
                crop=self.config.crop,
            )
        self.detector = detector
        self.color_classifier = color_classifier
        self.metadata_lookup: dict[str, dict[str, Any]] = {}
        if self.config.metadata_file:
            from densegrpo_geneval.metadata import metadata_by_prompt

            self.metadata_lookup = metadata_by_prompt(self.config.metadata_file)

    @classmethod
    def from_modules(
        cls,
        detector_model: Any,
        processor: Any,
        clip_model: Any,
        preprocess: Any,
        tokenizer: Any,
        config: Config | dict[str, Any] | None = None,
    ) -> "GenEvalReward":
        """Build from in-memory models (no weights are read): a Mask2Former and an open_clip CLIP."""
        from densegrpo_geneval.colors import ColorClassifier
        from densegrpo_geneval.detector import Mask2FormerDetector

        if not isinstance(config, cls.Config):
            config = cls.Config.model_validate(config or {})
        dtype = DTYPES[config.dtype]
        detector = Mask2FormerDetector(detector_model, processor, config.device, dtype)
        classifier = ColorClassifier(
            clip_model, preprocess, tokenizer, config.device, dtype, background=config.background, crop=config.crop
        )
        return cls(config, detector=detector, color_classifier=classifier)

    @classmethod
    def tiny(cls, seed: int = 0, **config: Any) -> "GenEvalReward":
        """Tiny random Mask2Former + open_clip CLIP, offline (the plumbing, not the scores, is real)."""
        from densegrpo_geneval.tiny import tiny_mask2former, tiny_open_clip

        return cls.from_modules(*tiny_mask2former(seed), *tiny_open_clip(seed), config)

    @classmethod
    def contract_instance(cls) -> "GenEvalReward":
        """The instance densegrpo's contract tests use (tiny, random, offline)."""
        return cls.tiny()

    def resolve_metadata(self, prompt: str, metadata: dict[str, Any] | None) -> dict[str, Any] | None:
        """The row's own metadata, else the ``metadata_file`` entry for its prompt, else ``None``."""
        return metadata if metadata is not None else self.metadata_lookup.get(prompt)

    def detections(self, pixels: np.ndarray, instances: list[Any], metadata: dict[str, Any]) -> dict[str, list[rules.Detection]]:
        """GenEval's kept detections of one image, by class, most confident first, colours filled in.

        ``pixels (H,W,3)`` RGB uint8; ``instances`` from the detector. Colours are classified only
        for classes whose include clause asks for a colour (the only place the rules read them).
        """
        raw = [rules.Detection(inst.label, None, inst.box, inst.score) for inst in instances]
        masks = {id(det): inst.mask for det, inst in zip(raw, instances)}
        threshold = rules.confidence_threshold(metadata, self.config.threshold, self.config.counting_threshold)
        grouped = rules.filter_detections(raw, threshold, self.config.max_objects)
        wanted = {req["class"] for req in metadata.get("include", []) if "color" in req}
        image = None
        for cls_name in sorted(wanted & grouped.keys()):
            kept = grouped[cls_name]
            image = image or Image.fromarray(pixels)
            colors = self.color_classifier.classify(image, [masks[id(d)] for d in kept], [d.box for d in kept], cls_name)
            grouped[cls_name] = [replace(d, color=color) for d, color in zip(kept, colors)]
        return grouped

    def score(self, metadata: dict[str, Any], grouped: dict[str, list[rules.Detection]]) -> float:
        """The configured rule on already filtered detections."""
        position = self.config.position_threshold
        if self.config.mode == "strict":
            return float(rules.strict_correct(metadata, grouped, position_threshold=position))
        if self.config.mode == "correct":
            return float(rules.geneval_correct(metadata, grouped, position_threshold=position))
        return rules.partial_score(metadata, grouped, position_threshold=position)

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None] | None = None) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] -> rewards ``(N,)`` float32 (NaN: no GenEval metadata)."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
        count = images.shape[0]
        metadata = list(metadata) if metadata is not None else [None] * count
        if len(prompts) != count or len(metadata) != count:
            raise ValueError(
                f"got {count} images, {len(prompts)} prompts and {len(metadata)} metadata entries; pass one of each per image"
            )
        resolved = [self.resolve_metadata(p, m) for p, m in zip(prompts, metadata)]
        pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
        pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3), as GenEval reads PNGs
        min_score = min(self.config.threshold, self.config.counting_threshold)
        rewards = torch.full((count,), float("nan"), dtype=torch.float32)
        rows = [i for i, m in enumerate(resolved) if m is not None]
        for start in range(0, len(rows), self.config.batch_size):
            chunk = rows[start : start + self.config.batch_size]
            per_image = self.detector(pixels[chunk], min_score=min_score)
            for i, instances in zip(chunk, per_image):
                meta = resolved[i]
                rewards[i] = self.score(meta, self.detections(pixels[i], instances, meta))
        return rewards
