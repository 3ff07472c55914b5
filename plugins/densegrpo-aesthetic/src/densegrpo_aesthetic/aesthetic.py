"""LAION aesthetic reward: the improved-aesthetic-predictor MLP on CLIP ViT-L/14 embeddings."""

from __future__ import annotations

from typing import Any, Literal

import torch
from densegrpo.api import (
    Dtype,
    Preprocess,
    check_inputs,
    hub_file,
    load_pretrained,
    load_state_dict,
    resolve_device,
    resolve_dtype,
)
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn


class AestheticMLP(nn.Module):
    """improved-aesthetic-predictor's head: 768 -> 1024 -> 128 -> 64 -> 16 -> 1, no activations.

    Layer names match ``sac+logos+ava1-l14-linearMSE.pth`` (``layers.0``, ``layers.2``,
    ``layers.4``, ``layers.6``, ``layers.7``); the dropouts are inactive at inference.
    """

    def __init__(self, input_size: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_size, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        """``(N, 768)`` L2-normalised CLIP image embeddings -> ``(N, 1)`` scores."""
        return self.layers(embeds)


class AestheticReward:
    """LAION aesthetic score (about 1-10): ``MLP(normalize(CLIP-L/14 image embedding))``.

    The embedding is ``CLIPModel.get_image_features`` of ``openai/clip-vit-large-patch14``,
    L2-normalised, then the improved-aesthetic-predictor MLP (Schuhmann, LAION), as in
    Flow-GRPO's and DDPO's ``aesthetic_scorer.py``. The prompt is not used.

    Call: ``images (N,3,H,W)`` float32 in [0,1] -> ``(N,)`` float32.

    Build it offline from in-memory modules with
    ``AestheticReward(config, clip_model=..., image_processor=..., mlp=...)``.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        clip_model: str = Field(
            "openai/clip-vit-large-patch14",
            description="CLIPModel and its image processor: hub id or local folder (the predictor was trained on OpenAI CLIP ViT-L/14).",
        )
        head: str = Field(
            "trl-lib/ddpo-aesthetic-predictor",
            description="MLP weights: hub repo id, local folder or local .pth/.safetensors file "
            "(the hub repo mirrors improved-aesthetic-predictor's sac+logos+ava1-l14-linearMSE.pth).",
        )
        head_filename: str = Field("aesthetic-model.pth", description="File name of the MLP weights in the `head` repo or folder.")
        device: str | None = Field(None, description="Torch device; null picks cuda when available, else cpu.")
        dtype: Dtype = Field("float32", description="CLIP weights dtype; the small MLP always runs in float32.")
        batch_size: int = Field(32, ge=1, description="Images per forward pass.")
        preprocess: Literal["torch", "processor"] = Field(
            "torch",
            description="'torch': resize/crop/normalise the float batch in torch (batched, differentiable); "
            "'processor': 8-bit images through the CLIP image processor, exactly as the reference code (no gradients).",
        )
        offline: bool = Field(
            False, description="Never contact the hub (HF_HUB_OFFLINE=1 does the same); weights must be cached or local."
        )

    def __init__(
        self,
        config: Config | None = None,
        *,
        clip_model: Any = None,
        image_processor: Any = None,
        mlp: AestheticMLP | None = None,
    ) -> None:
        self.config = cfg = config if config is not None else self.Config()
        if clip_model is None or image_processor is None:
            from transformers import CLIPImageProcessor, CLIPModel

            if image_processor is None:
                image_processor = load_pretrained(
                    CLIPImageProcessor.from_pretrained, cfg.clip_model, what="aesthetic CLIP image processor",
                    field="clip_model", offline=cfg.offline,
                )
            if clip_model is None:
                clip_model = load_pretrained(
                    CLIPModel.from_pretrained, cfg.clip_model, what="aesthetic CLIP model", field="clip_model",
                    offline=cfg.offline,
                )
        if mlp is None:
            path = hub_file(cfg.head, cfg.head_filename, what="aesthetic MLP", field="head", offline=cfg.offline)
            mlp = AestheticMLP()
            mlp.load_state_dict(load_state_dict(path))
        device = resolve_device(cfg.device)
        self.clip_model = clip_model.to(device=device, dtype=resolve_dtype(cfg.dtype)).eval().requires_grad_(False)
        self.mlp = mlp.to(device=device, dtype=torch.float32).eval().requires_grad_(False)
        self.image_processor = image_processor
        self.preprocess = Preprocess.from_image_processor(image_processor)

    @classmethod
    def from_modules(
        cls, clip_model: Any, image_processor: Any, mlp: AestheticMLP, config: Config | None = None
    ) -> "AestheticReward":
        """Wrap an in-memory ``CLIPModel``, ``CLIPImageProcessor`` and :class:`AestheticMLP`."""
        return cls(config, clip_model=clip_model, image_processor=image_processor, mlp=mlp)

    @classmethod
    def contract_instance(cls) -> "AestheticReward":
        """A tiny random-weight instance for the core contract tests (offline, CPU)."""
        from densegrpo_aesthetic.testing import tiny_aesthetic

        return tiny_aesthetic()

    def image_embeds(self, images: Tensor) -> Tensor:
        """``(N,3,H,W)`` in [0,1] -> L2-normalised CLIP image embeddings ``(N, 768)`` float32."""
        device = next(self.clip_model.parameters()).device
        dtype = next(self.clip_model.parameters()).dtype
        if self.config.preprocess == "processor":
            u8 = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8).cpu()
            pixels = self.image_processor(images=list(u8), return_tensors="pt")["pixel_values"]
        else:
            pixels = self.preprocess(images.to(device))
        features = self.clip_model.get_image_features(pixel_values=pixels.to(device=device, dtype=dtype))
        features = (features if isinstance(features, Tensor) else features.pooler_output).float()
        return features / features.norm(p=2, dim=-1, keepdim=True)

    def score(self, images: Tensor) -> Tensor:
        """Like ``__call__`` but keeps gradients: ``(N,3,H,W)`` -> ``(N,)`` float32."""
        check_inputs(images, None, need_prompts=False)
        out = [
            self.mlp(self.image_embeds(images[start : start + self.config.batch_size])).squeeze(-1)
            for start in range(0, images.shape[0], self.config.batch_size)
        ]
        if not out:
            return torch.zeros(0, dtype=torch.float32, device=images.device)
        return torch.cat(out).to(device=images.device, dtype=torch.float32)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] -> ``(N,)`` float32 aesthetic scores."""
        with torch.no_grad():
            return self.score(images)
