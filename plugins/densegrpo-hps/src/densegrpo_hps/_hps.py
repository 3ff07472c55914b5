"""HPS scoring on hpsv2x's bundled open_clip: checkpoint loading, batched preprocessing, scores.

The reference is ``hpsv2.img_score.score`` (and Flow-GRPO's ``hpsv2_scorer.py``): an open_clip
``ViT-H-14`` built by ``create_model_and_transforms(..., light_augmentation=True,
output_dict=True)``, the HPS checkpoint's ``state_dict`` loaded on top, the validation transform
``ToTensor -> ResizeMaxSize(224) -> Normalize`` and ``diag(image_features @ text_features.T)``
(method.md section 5). hpsv2 is imported only when a model is built.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from densegrpo.api import (
    CheckpointLoadError,
    Dtype,
    UserError,
    WeightsNotFoundError,
    check_inputs,
    hub_file,
    load_state_dict,
    one_line,
    resolve_device,
    resolve_dtype,
)
from torch import Tensor

__all__ = ["CheckpointLoadError", "Dtype", "HPSScorer", "WeightsNotFoundError", "build_scorer", "create_model"]

HUB_REPO = "xswu/HPSv2"
TINY_ARCHITECTURE = "densegrpo-tiny-hps"


class MissingHPSv2Error(UserError, ImportError):
    """hpsv2x is not installed (it is installed with --no-deps, outside the plugin's dependencies)."""


def import_open_clip() -> Any:
    """hpsv2x's bundled open_clip, or one line that says how to install it."""
    try:
        with warnings.catch_warnings():  # hpsv2's open_clip imports timm.models.layers (deprecated)
            warnings.simplefilter("ignore", FutureWarning)
            import hpsv2.src.open_clip as open_clip
    except ImportError as error:
        raise MissingHPSv2Error(
            f"the HPS rewards need hpsv2x ({one_line(error)}); run `pip install --no-deps hpsv2x==1.2.0` "
            "and `pip install clint`"
        ) from error
    return open_clip


def register_tiny_architecture() -> str:
    """Make hpsv2's open_clip know the tiny test architecture; returns its name."""
    open_clip = import_open_clip()
    if open_clip.get_model_config(TINY_ARCHITECTURE) is None:
        open_clip.add_model_config(Path(__file__).parent / "model_configs" / f"{TINY_ARCHITECTURE}.json")
    return TINY_ARCHITECTURE


def create_model(architecture: str) -> Any:
    """hpsv2's open_clip model with random weights (the checkpoint replaces all of them)."""
    open_clip = import_open_clip()
    if architecture == TINY_ARCHITECTURE:
        register_tiny_architecture()
    if open_clip.get_model_config(architecture) is None:
        raise ValueError(
            f"hpsv2's open_clip has no architecture '{architecture}'; use 'ViT-H-14' (the HPS model)"
        )
    # pretrained=None: the reference first loads laion2B weights that the HPS state_dict then
    # overwrites entirely; skipping them avoids a 4 GB download with the same result.
    return open_clip.create_model(architecture, None, precision="fp32", device="cpu", output_dict=True)


class HPSScorer:
    """``diag(image_features @ text_features.T)`` for each (image, prompt) pair, in batches.

    Args:
        model: hpsv2's open_clip ``CLIP`` (``output_dict=True``) on its device and dtype.
        tokenizer: ``texts -> (N, 77)`` token ids (hpsv2's ``tokenize``).
        batch_size: pairs per forward pass.
    """

    def __init__(self, model: Any, tokenizer: Callable[[list[str]], Tensor], batch_size: int) -> None:
        self.model = model.eval().requires_grad_(False)
        self.model.output_dict = True
        self.tokenizer = tokenizer
        self.batch_size = int(batch_size)
        size = model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        if isinstance(size, (tuple, list)) and size[0] != size[1]:
            raise ValueError(f"HPS preprocessing needs a square model input, got image_size {tuple(size)}")
        from hpsv2.src.open_clip.constants import (
            OPENAI_DATASET_MEAN,
            OPENAI_DATASET_STD,
        )

        self.mean = tuple(getattr(model.visual, "image_mean", None) or OPENAI_DATASET_MEAN)
        self.std = tuple(getattr(model.visual, "image_std", None) or OPENAI_DATASET_STD)

    def preprocess(self, images: Tensor) -> Tensor:
        """``(N,3,H,W)`` in [0,1] -> ``(N,3,S,S)``: hpsv2's ``ResizeMaxSize(S)`` then ``Normalize``.

        The longest side is resized to ``S`` (bicubic, antialiased, on float values like the
        reference, which resizes after ``ToTensor``), the rest is zero-padded, centred.
        """
        import torchvision.transforms.functional as F
        from torchvision.transforms import InterpolationMode

        x = images.float()
        height, width = x.shape[-2:]
        scale = self.image_size / float(max(height, width))
        if scale != 1.0:
            new_h, new_w = round(height * scale), round(width * scale)
            x = F.resize(x, [new_h, new_w], InterpolationMode.BICUBIC, antialias=True)
            pad_h, pad_w = self.image_size - new_h, self.image_size - new_w
            x = F.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        mean = x.new_tensor(self.mean).view(1, 3, 1, 1)
        std = x.new_tensor(self.std).view(1, 3, 1, 1)
        return (x - mean) / std

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """``images (N,3,H,W)``, ``N`` prompts -> ``(N,)`` float32; keeps the autograd graph."""
        check_inputs(images, prompts)
        param = next(self.model.parameters())
        out = []
        for start in range(0, images.shape[0], self.batch_size):
            stop = start + self.batch_size
            pixels = self.preprocess(images[start:stop].to(param.device)).to(param.dtype)
            text = self.tokenizer(list(prompts[start:stop])).to(param.device)
            features = self.model(pixels, text)
            image_features, text_features = features["image_features"], features["text_features"]
            out.append((image_features.float() * text_features.float()).sum(-1))  # diag(I @ T.T)
        if not out:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        return torch.cat(out).to(device=images.device, dtype=torch.float32)


def build_scorer(config: Any, *, what: str, model: Any = None, tokenizer: Any = None) -> HPSScorer:
    """Build (or take) the model and tokenizer named by an HPS reward ``config``."""
    open_clip = import_open_clip()
    if model is None:
        path = hub_file(
            config.checkpoint, config.checkpoint_filename, what=what, field="checkpoint", offline=config.offline,
            noun="checkpoint", local_file="a local .pt file",
        )
        state = load_state_dict(
            path, allow_pickle=config.allow_pickle,
            fix="if you trust this file, set the reward's `allow_pickle: true`, or convert it to .safetensors",
        )
        model = create_model(config.architecture)
        model.load_state_dict(state, strict=True)
    if tokenizer is None:
        if config.architecture == TINY_ARCHITECTURE:
            register_tiny_architecture()
        tokenizer = open_clip.get_tokenizer(config.architecture)
    model = model.to(device=resolve_device(config.device), dtype=resolve_dtype(config.dtype))
    return HPSScorer(model, tokenizer, config.batch_size)
