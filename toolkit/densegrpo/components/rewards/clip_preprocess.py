"""Batched, differentiable torch preprocessing for CLIP rewards, and their input checks.

:class:`Preprocess` applies a transformers ``CLIPImageProcessor``'s settings (resize, center crop,
normalise) in torch on an ``(N,3,H,W)`` batch in [0, 1], so reward gradients reach the images.
Shared by the CLIP-based reward plugins (PickScore, CLIPScore, aesthetic). Nothing here imports
transformers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from torch import Tensor


def check_inputs(images: Tensor, prompts: Sequence[str] | None, *, need_prompts: bool = True) -> None:
    """Raise ValueError unless ``images`` is ``(N,3,H,W)`` floating and (when needed) ``N`` prompts come with it."""
    if not isinstance(images, Tensor) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"images must be a float tensor of shape (N, 3, H, W) in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(
            f"images must be floating point in [0, 1], got {images.dtype}; divide uint8 images by 255"
        )
    if need_prompts and (prompts is None or len(prompts) != images.shape[0]):
        got = "none" if prompts is None else len(prompts)
        raise ValueError(f"got {images.shape[0]} images but {got} prompts; pass one prompt per image")


@dataclass(frozen=True)
class Preprocess:
    """The image processor's settings, applied in torch on a ``(N,3,H,W)`` batch.

    Mirrors transformers' torchvision ``CLIPImageProcessor``: resize the shortest edge
    (bicubic, antialiased), clamp to [0, 1] as the reference's uint8 images saturate, center
    crop, normalise. Differentiable and batched. Against the processor on 8-bit PIL images
    (the reference path) it differs only by the processor's rounding to 8 bits after the resize.
    """

    shortest_edge: int | None
    resize_hw: tuple[int, int] | None
    crop_hw: tuple[int, int] | None
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Any

    @classmethod
    def from_image_processor(cls, processor: Any) -> "Preprocess":
        from torchvision.transforms.v2 import InterpolationMode

        def as_dict(value: Any) -> dict[str, Any]:
            if value is None:
                return {}
            if isinstance(value, int):
                return {"height": value, "width": value}
            return {k: v for k, v in dict(value).items() if v is not None}

        size = as_dict(getattr(processor, "size", None)) if getattr(processor, "do_resize", True) else {}
        crop = as_dict(getattr(processor, "crop_size", None)) if getattr(processor, "do_center_crop", True) else {}
        resample = getattr(processor, "resample", 3)
        modes = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}
        return cls(
            shortest_edge=size.get("shortest_edge"),
            resize_hw=(size["height"], size["width"]) if "height" in size else None,
            crop_hw=(crop["height"], crop["width"]) if "height" in crop else None,
            mean=tuple(float(m) for m in processor.image_mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in processor.image_std),  # type: ignore[arg-type]
            interpolation=modes.get(int(resample), InterpolationMode.BICUBIC),
        )

    def __call__(self, images: Tensor) -> Tensor:
        """``images (N,3,H,W)`` in [0,1] -> ``pixel_values (N,3,h,w)`` float32."""
        from torchvision.transforms.v2 import functional as tvF

        x = images.float()
        height, width = x.shape[-2:]
        if self.shortest_edge is not None:
            # transformers' get_resize_output_image_size(default_to_square=False)
            short, long = (width, height) if width <= height else (height, width)
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
            new_hw = (new_long, new_short) if width <= height else (new_short, new_long)
            x = tvF.resize(x, list(new_hw), interpolation=self.interpolation, antialias=True)
        elif self.resize_hw is not None:
            x = tvF.resize(x, list(self.resize_hw), interpolation=self.interpolation, antialias=True)
        if self.shortest_edge is not None or self.resize_hw is not None:
            # bicubic overshoots; the reference path resizes uint8 images, which saturate
            x = x.clamp(0.0, 1.0)
        if self.crop_hw is not None:
            x = _center_crop(x, self.crop_hw)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std


def _center_crop(x: Tensor, crop_hw: tuple[int, int]) -> Tensor:
    """transformers' torchvision center crop: zero-pad when too small, ``int`` offsets."""
    import torch.nn.functional as F

    crop_h, crop_w = crop_hw
    height, width = x.shape[-2:]
    if crop_w > width or crop_h > height:
        pad_w, pad_h = max(crop_w - width, 0), max(crop_h - height, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        height, width = x.shape[-2:]
    top, left = int((height - crop_h) / 2.0), int((width - crop_w) / 2.0)
    return x[..., top : top + crop_h, left : left + crop_w]
