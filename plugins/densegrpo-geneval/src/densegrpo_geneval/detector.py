"""GenEval's object detector on transformers: Mask2Former COCO instance segmentation.

GenEval runs mmdetection's ``mask2former_swin-s-p4-w7-224_lsj_8x2_50e_coco``. Here the same
architecture family comes from transformers (``Mask2FormerForUniversalSegmentation``, e.g.
``facebook/mask2former-swin-small-coco-instance``), post-processed by the library's
``post_process_instance_segmentation``. Its score is mmdet's: class probability times the mean
mask probability inside the binary mask. Boxes come from the masks as in mmdet's ``mask2bbox``.
Known differences from the mmdet pipeline: input resizing follows the checkpoint's image
processor, and the library thresholds masks at 384 px before a nearest-neighbour resize to the
image size (mmdet upsamples the logits first).
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from densegrpo.api import hub_reachable, is_local
from torch import Tensor

from densegrpo_geneval.classes import class_names_for
from densegrpo_geneval.errors import MissingWeightsError

DETECTOR_HINT = (
    "set detector_path to a local folder saved with Mask2FormerForUniversalSegmentation.save_pretrained "
    "(with its preprocessor_config.json), or run `huggingface-cli download {repo}` on a connected machine"
)


@dataclass
class Instance:
    """One segmented object: GenEval class name, detector score, binary mask ``(H, W)`` and box."""

    label: str
    score: float
    mask: np.ndarray
    box: tuple[float, float, float, float]


def box_from_mask(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """mmdet's ``mask2bbox``: ``(x_first, y_first, x_last + 1, y_last + 1)`` of the mask's pixels."""
    columns = np.flatnonzero(mask.any(axis=0))
    rows = np.flatnonzero(mask.any(axis=1))
    if columns.size == 0 or rows.size == 0:
        return None
    return (float(columns[0]), float(rows[0]), float(columns[-1] + 1), float(rows[-1] + 1))


class Mask2FormerDetector:
    """Images -> per-image lists of :class:`Instance` (all queries kept above ``min_score``)."""

    def __init__(self, model: Any, processor: Any, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)
        self.dtype = dtype
        id2label = {int(k): v for k, v in model.config.id2label.items()}
        self.class_names = class_names_for(id2label)

    @classmethod
    def from_pretrained(cls, path: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> "Mask2FormerDetector":
        """A Mask2Former checkpoint and its image processor, from a local folder or the hub cache."""
        from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation

        attempts = [True] if is_local(path) else ([True, False] if hub_reachable() else [True])
        for local_only in attempts:
            try:
                model = Mask2FormerForUniversalSegmentation.from_pretrained(path, local_files_only=local_only)
                processor = AutoImageProcessor.from_pretrained(path, local_files_only=local_only)
                return cls(model, processor, device, dtype)
            except OSError:
                continue
        raise MissingWeightsError(
            f"GenEval detector weights {path!r} were not found locally and could not be downloaded (offline?); "
            + DETECTOR_HINT.format(repo=path)
        )

    @torch.no_grad()
    def __call__(self, pixels: np.ndarray, min_score: float = 0.0) -> list[list[Instance]]:
        """``pixels (N,H,W,3)`` RGB uint8 -> instances with score ``>= min_score``, per image."""
        height, width = pixels.shape[1:3]
        inputs = self.processor(images=list(pixels), return_tensors="pt")
        pixel_values = inputs["pixel_values"].to(device=self.device, dtype=self.dtype)
        pixel_mask = inputs.get("pixel_mask")
        outputs = self.model(
            pixel_values=pixel_values, pixel_mask=None if pixel_mask is None else pixel_mask.to(self.device)
        )
        logits = SimpleNamespace(  # post-process in float32 on the CPU whatever the model dtype
            class_queries_logits=outputs.class_queries_logits.float().cpu(),
            masks_queries_logits=outputs.masks_queries_logits.float().cpu(),
        )
        results = self.processor.post_process_instance_segmentation(
            logits, threshold=min_score, target_sizes=[(height, width)] * len(pixels), return_binary_maps=True
        )
        return [self._instances(result) for result in results]

    def _instances(self, result: dict[str, Any]) -> list[Instance]:
        segments = result["segments_info"]
        if not segments:
            return []
        maps: Tensor = result["segmentation"]  # (num_instances, H, W) binary
        instances = []
        for segment, binary in zip(segments, maps):
            mask = binary.numpy() > 0.5
            box = box_from_mask(mask)
            if box is None:
                continue
            instances.append(Instance(self.class_names[segment["label_id"]], float(segment["score"]), mask, box))
        return instances
