"""A tiny image-text model for the toy world, built with open_clip.

It is an ``open_clip.CLIP`` with a custom tiny configuration (:data:`TOY_CLIP_CONFIG`): a
2-layer ViT with 8x8 patches on 32x32 images and a 2-layer causal text transformer on
open_clip's own BPE tokenizer (CLIP's 49408-token vocabulary, shipped inside open_clip, so it
works offline). ``scripts/train_toy_clip.py`` trains it contrastively on toy (render, prompt)
pairs; the weights ship in ``densegrpo/worlds/toy/weights/toy_clip/`` (``config.json`` +
``model.safetensors``, stored as float16 and loaded as float32).

The score of an (image, prompt) pair is PickScore's formula (method.md, section 5):
``logit_scale.exp() * cos(text_features, image_features)``.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from densegrpo.contracts.errors import UserError

CLIP_VOCAB_SIZE = 49408
"""CLIP's BPE vocabulary size; open_clip's tokenizer must have exactly this many tokens."""

TOY_CLIP_CONFIG: dict[str, Any] = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "layers": 2, "width": 48, "head_width": 24, "mlp_ratio": 2.0},
    "text_cfg": {
        "context_length": 16,
        "vocab_size": CLIP_VOCAB_SIZE,
        "width": 32,
        "heads": 4,
        "layers": 2,
        "mlp_ratio": 2.0,
    },
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
}
"""Architecture and preprocessing of the toy CLIP (``config.json`` beside the weights)."""

WEIGHTS_PACKAGE = "densegrpo.worlds.toy"
WEIGHTS_FOLDER = ("weights", "toy_clip")


def toy_tokenizer(context_length: int) -> open_clip.tokenizer.SimpleTokenizer:
    """open_clip's CLIP BPE tokenizer; asserts the 49408-token vocabulary (no hub access)."""
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
    if len(tokenizer.encoder) != CLIP_VOCAB_SIZE:
        raise UserError(
            f"open_clip's tokenizer has {len(tokenizer.encoder)} tokens, expected {CLIP_VOCAB_SIZE}; "
            "reinstall open_clip_torch"
        )
    return tokenizer


class ToyCLIP(torch.nn.Module):
    """open_clip ``CLIP`` plus its tokenizer and preprocessing.

    ``config`` is a dict shaped like :data:`TOY_CLIP_CONFIG`.
    """

    def __init__(self, config: dict[str, Any] | None = None):
        super().__init__()
        self.config = json.loads(json.dumps(config or TOY_CLIP_CONFIG))
        self.model = open_clip.CLIP(
            embed_dim=self.config["embed_dim"],
            vision_cfg=open_clip.model.CLIPVisionCfg(**self.config["vision_cfg"]),
            text_cfg=open_clip.model.CLIPTextCfg(**self.config["text_cfg"]),
        )
        self.tokenizer = toy_tokenizer(self.config["text_cfg"]["context_length"])
        self.image_size = int(self.config["vision_cfg"]["image_size"])
        self.register_buffer("mean", torch.tensor(self.config["image_mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(self.config["image_std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        """``N`` prompts -> token ids ``(N, context_length)`` long (truncated to fit)."""
        return self.tokenizer(list(prompts)).to(self.device)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """``images (N,3,H,W)`` float in [0,1], any ``H,W >= 32`` -> normalised ``(N,3,32,32)``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (N,3,H,W), got shape {tuple(images.shape)}")
        images = images.to(self.device, torch.float32)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(
                images, size=(self.image_size, self.image_size), mode="bilinear", antialias=True, align_corners=False
            )
        return (images - self.mean) / self.std

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``(N,3,H,W)`` in [0,1] -> unit-norm ``(N, embed_dim)``."""
        return self.model.encode_image(self.preprocess(images), normalize=True)

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        """``N`` prompts -> unit-norm ``(N, embed_dim)``."""
        return self.model.encode_text(self.tokenize(prompts), normalize=True)

    def score(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """PickScore formula per pair: ``logit_scale.exp() * cos(text_i, image_i)``, ``(N,)`` float32."""
        image = self.image_features(images)
        text = self.text_features(prompts)
        return self.model.logit_scale.exp() * (image * text).sum(-1)

    def save(self, folder: str | Path) -> None:
        """Write ``config.json`` and ``model.safetensors`` (float16) into ``folder``."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.config, indent=2) + "\n", encoding="utf-8")
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "open_clip.CLIP"})

    @classmethod
    def load(cls, folder: str | Path | None = None) -> "ToyCLIP":
        """Load from ``folder``, or from the weights shipped in the package when ``None``."""
        if folder is None:
            root = resources.files(WEIGHTS_PACKAGE).joinpath(*WEIGHTS_FOLDER)
            with resources.as_file(root) as path:
                return cls._load_from(Path(path))
        return cls._load_from(Path(folder))

    @classmethod
    def _load_from(cls, folder: Path) -> "ToyCLIP":
        config_path, weights_path = folder / "config.json", folder / "model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise UserError(
                f"toy CLIP weights are missing in '{folder}'; reinstall densegrpo or run "
                "scripts/train_toy_clip.py to train them"
            )
        model = cls(json.loads(config_path.read_text(encoding="utf-8")))
        state = {k: v.to(torch.float32) for k, v in load_file(str(weights_path)).items()}
        model.model.load_state_dict(state)
        return model.eval()


@torch.no_grad()
def evaluate_retrieval(
    model: ToyCLIP, metadatas: list[dict[str, Any]], seed: int, per_prompt: int = 8
) -> dict[str, float]:
    """Retrieval quality on fresh renders of ``metadatas`` (e.g. the held-out ``toy-test`` set).

    Renders ``per_prompt`` scenes per prompt and scores each image against every prompt of the
    set. A caption is *true* for an image when its metadata is strictly satisfied by the
    scene's ground truth (GenEval rules), so "a photo of a circle" counts as a correct answer
    for a red circle too.

    Returns:
        top1: fraction of images whose best-scoring caption is true.
        pairwise: fraction of (image, false caption) pairs where the image's own caption
            scores higher than the false one.
        margin: mean score gap between the own caption and the false captions.
    """
    from densegrpo.worlds.geneval_rules import strict_correct
    from densegrpo.worlds.toy.scenes import (
        render_scenes,
        sample_scenes,
        truth_detections,
    )

    prompts = [m["prompt"] for m in metadatas]
    repeated = [m for m in metadatas for _ in range(per_prompt)]
    scenes = sample_scenes(repeated, seed)
    images = render_scenes(scenes)
    size = int(images.shape[-1])
    image_features = torch.cat([model.image_features(chunk) for chunk in images.split(512)])
    text_features = model.text_features(prompts)
    scores = model.model.logit_scale.exp() * image_features @ text_features.T  # (N images, P prompts)
    own = torch.arange(len(metadatas)).repeat_interleave(per_prompt)
    truth = torch.tensor(
        [[strict_correct(m, truth_detections(scene, size)) for m in metadatas] for scene in scenes]
    )
    top1 = truth[torch.arange(len(scenes)), scores.argmax(1)].float().mean()
    own_score = scores[torch.arange(len(scenes)), own][:, None]
    false = ~truth
    pairwise = ((own_score > scores) & false).sum() / false.sum().clamp(min=1)
    margin = ((own_score - scores) * false).sum() / false.sum().clamp(min=1)
    return {"top1": float(top1), "pairwise": float(pairwise), "margin": float(margin)}
