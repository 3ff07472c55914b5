"""GenEval's colour classifier: zero-shot CLIP (ViT-L-14, OpenAI weights) on the masked crop.

Following ``color_classification`` in djghosh13/geneval ``evaluation/evaluate_images.py``:
the object is pasted on a grey ``#999`` background through its mask, cropped to its box, run
through open_clip's eval transform, and classified among GenEval's 10 colours. Each colour's
text embedding is clip_benchmark's ``zero_shot_classifier``: the three templates of
:data:`COLOR_TEMPLATES` encoded, L2-normalised, averaged and normalised again.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from densegrpo.api import cached_file, hub_reachable, is_local
from PIL import Image
from torch import Tensor

from densegrpo_geneval.classes import COLOR_TEMPLATES, COLORS
from densegrpo_geneval.errors import MissingWeightsError

CLIP_HINT = (
    "set clip_pretrained to a local open_clip checkpoint file (e.g. open_clip_model.safetensors of "
    "timm/vit_large_patch14_clip_224.openai), or download it on a connected machine"
)


class ColorClassifier:
    """``classify(image, instances, object_name) -> colour words`` with a CLIP model."""

    def __init__(
        self,
        model: Any,
        preprocess: Callable[[Image.Image], Tensor],
        tokenizer: Callable[[list[str]], Tensor],
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        background: str = "#999",
        crop: bool = True,
        batch_size: int = 16,
    ) -> None:
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.dtype = dtype
        self.background = background
        self.crop = crop
        self.batch_size = batch_size
        self._text_weights: dict[str, Tensor] = {}

    @classmethod
    def from_pretrained(
        cls, arch: str, pretrained: str, quick_gelu: bool, device: str = "cpu", dtype: torch.dtype = torch.float32, **kwargs: Any
    ) -> "ColorClassifier":
        """open_clip ``arch`` with ``pretrained`` (a tag such as ``openai`` or a local checkpoint file)."""
        import open_clip

        if is_local(pretrained):
            weights, force_quick_gelu = pretrained, quick_gelu
        else:
            tag = open_clip.get_pretrained_cfg(arch, pretrained)
            if not tag:
                raise MissingWeightsError(f"open_clip has no pretrained tag {pretrained!r} for {arch}; {CLIP_HINT}")
            force_quick_gelu = bool(tag.get("quick_gelu", False))
            repo = (tag.get("hf_hub") or "").rstrip("/")
            weights = None
            for name in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
                found = cached_file(repo, name) if repo else None
                if found is not None:
                    weights = str(found)
                    break
            if weights is None:
                if not hub_reachable():
                    raise MissingWeightsError(
                        f"CLIP weights {arch}/{pretrained} ({repo or tag.get('url')}) are not in the local cache "
                        f"and the hub is offline; {CLIP_HINT}"
                    )
                weights = pretrained  # let open_clip download them
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=weights, force_quick_gelu=force_quick_gelu, device=device
        )
        return cls(model, preprocess, open_clip.get_tokenizer(arch), device, dtype, **kwargs)

    @torch.no_grad()
    def text_weights(self, object_name: str) -> Tensor:
        """``(len(COLORS), D)`` unit vectors, one per colour, for ``object_name`` (cached)."""
        if object_name not in self._text_weights:
            rows = []
            for color in COLORS:
                texts = [t.format(color=color, object=object_name) for t in COLOR_TEMPLATES]
                tokens = self.tokenizer(texts).to(self.device)
                embeddings = F.normalize(self.model.encode_text(tokens).float(), dim=-1).mean(dim=0)
                rows.append(embeddings / embeddings.norm())
            self._text_weights[object_name] = torch.stack(rows)
        return self._text_weights[object_name]

    def crops(self, image: Image.Image, masks: list[np.ndarray], boxes: list[tuple[float, ...]]) -> list[Image.Image]:
        """GenEval's ``ImageCrops``: masked object on a grey background, cropped to its box."""
        blank = Image.new("RGB", image.size, color=self.background)
        out = []
        for mask, box in zip(masks, boxes):
            crop = Image.composite(image, blank, Image.fromarray(mask))
            out.append(crop.crop(tuple(box[:4])) if self.crop else crop)
        return out

    @torch.no_grad()
    def logits(self, image: Image.Image, masks: list[np.ndarray], boxes: list[tuple[float, ...]], object_name: str) -> Tensor:
        """``(len(masks), len(COLORS))``: ``100 * cos(crop, colour)`` as clip_benchmark's ``run_classification``."""
        weights = self.text_weights(object_name)
        crops = self.crops(image, masks, boxes)
        out = []
        for start in range(0, len(crops), self.batch_size):
            batch = torch.stack([self.preprocess(c) for c in crops[start : start + self.batch_size]])
            features = self.model.encode_image(batch.to(device=self.device, dtype=self.dtype)).float()
            out.append(100.0 * F.normalize(features, dim=-1) @ weights.T)
        return torch.cat(out) if out else torch.zeros(0, len(COLORS))

    def classify(self, image: Image.Image, masks: list[np.ndarray], boxes: list[tuple[float, ...]], object_name: str) -> list[str]:
        """The colour word of each object (the colour of highest cosine similarity)."""
        if not masks:
            return []
        return [COLORS[int(i)] for i in self.logits(image, masks, boxes, object_name).argmax(dim=1)]
