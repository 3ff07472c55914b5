"""Weight loading, input checks and batched torch CLIP preprocessing for the aesthetic reward.

This is the same code as ``densegrpo_pickscore._clip`` (kept as a copy so that each plugin
installs on its own). Nothing here imports transformers at module import time.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from torch import Tensor

from densegrpo.errors import UserError

Dtype = Literal["float32", "float16", "bfloat16"]
PreprocessMode = Literal["torch", "processor"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}


class WeightsNotFoundError(UserError, OSError):
    """Reward weights that are neither a local folder nor reachable on the hub."""


def hub_offline(flag: bool) -> bool:
    """True when the config or the environment (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE) says offline."""
    env = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return flag or any(value in _TRUE for value in env)


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    return _DTYPES[dtype]


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}"


def probe_hub(repo_id: str) -> None:
    """Fail within seconds when the hub is unreachable (download retries can take a minute)."""
    from huggingface_hub import HfApi

    HfApi().model_info(repo_id, timeout=10)


def load_pretrained(
    load: Callable[..., Any], source: str, *, what: str, field: str, offline: bool
) -> Any:
    """``load(source, local_files_only=...)`` from a local folder, the cache, then the hub.

    The cache is tried first with ``local_files_only=True`` so cached weights never touch the
    network; the hub is only contacted when not offline. Every failure to find the weights
    becomes one :class:`WeightsNotFoundError` line that says how to point at them.
    """
    path = Path(source).expanduser()
    if path.exists():
        return load(str(path), local_files_only=True)
    if not _REPO_ID.match(source):
        raise WeightsNotFoundError(
            f"{what} folder '{source}' does not exist; set the reward's `{field}` to a folder saved "
            "with save_pretrained or to a Hugging Face hub id"
        )
    try:
        return load(source, local_files_only=True)
    except OSError as error:
        if hub_offline(offline):
            raise WeightsNotFoundError(
                f"{what} '{source}' is not in the local Hugging Face cache and the hub is "
                f"offline; run `hf download {source}` where there is network, or set the reward's "
                f"`{field}` to a local folder"
            ) from error
    try:
        probe_hub(source)
        return load(source, local_files_only=False)
    except Exception as error:  # network, auth and missing-repo errors all end here
        raise WeightsNotFoundError(
            f"{what} '{source}' could not be downloaded ({one_line(error)}); run "
            f"`hf download {source}` where there is network, or set the reward's `{field}` to a local folder"
        ) from error


def check_inputs(images: Tensor, prompts: Sequence[str] | None, *, need_prompts: bool) -> None:
    """Raise ValueError unless ``images`` is ``(N,3,H,W)`` floating and prompts match N."""
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


def load_hub_file(source: str, filename: str, *, what: str, field: str, offline: bool) -> str:
    """Path of ``filename``: a local file, a file in a local folder, or a hub repo's file.

    The cache is tried first (``local_files_only=True``); the hub only when not offline.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        if (path / filename).is_file():
            return str(path / filename)
        raise WeightsNotFoundError(
            f"{what} file '{filename}' is not in folder '{source}'; set the reward's `{field}` to the file itself"
        )
    if not _REPO_ID.match(source):
        raise WeightsNotFoundError(
            f"{what} file '{source}' does not exist; set the reward's `{field}` to a local file or a hub repo id"
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(source, filename, local_files_only=True)
    except OSError as error:
        if hub_offline(offline):
            raise WeightsNotFoundError(
                f"{what} weights '{source}/{filename}' are not in the local Hugging Face cache and the hub "
                f"is offline; run `hf download {source} {filename}` where there is network, or set the "
                f"reward's `{field}` to a local file"
            ) from error
    try:
        probe_hub(source)
        return hf_hub_download(source, filename)
    except Exception as error:
        raise WeightsNotFoundError(
            f"{what} weights '{source}/{filename}' could not be downloaded ({one_line(error)}); run "
            f"`hf download {source} {filename}` where there is network, or set the reward's `{field}` to a local file"
        ) from error


def load_state_dict(path: str) -> dict[str, Tensor]:
    """safetensors when the file is one, else ``torch.load(weights_only=True)`` (no pickled code)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state
