"""HPS v2.0 reward (Human Preference Score v2.0, Wu et al., 2023) on hpsv2x."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo_hps._hps import HUB_REPO, Dtype, HPSScorer, build_scorer


class HPSv2Reward:
    """HPS v2.0: ``diag(image_features @ text_features.T)`` of open_clip ViT-H-14 (method.md section 5).

    The model is hpsv2x's open_clip ``ViT-H-14`` with the ``HPS_v2_compressed.pt`` state dict
    from ``xswu/HPSv2``; images are preprocessed in torch as hpsv2's validation
    transform (longest side resized to 224, zero padding, CLIP normalisation); features are
    L2-normalised, so the score is the cosine similarity (about 0.2-0.35 for real images).

    Call: ``images (N,3,H,W)`` float32 in [0,1], ``N`` prompts -> ``(N,)`` float32.

    Build it offline from an in-memory model with ``HPSv2Reward.from_modules(model, config)``.
    """

    version = "v2.0"

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        checkpoint: str = Field(
            HUB_REPO,
            description="HPS weights: hub repo id, local folder or local .pt/.safetensors file (Wu et al. 2023, xswu/HPSv2).",
        )
        checkpoint_filename: str = Field("HPS_v2_compressed.pt", description="File name of the HPS v2.0 checkpoint in the repo or folder.")
        architecture: str = Field("ViT-H-14", description="hpsv2's open_clip architecture the checkpoint belongs to.")
        device: str | None = Field(None, description="Torch device; null picks cuda when available, else cpu.")
        dtype: Dtype = Field(
            "float32",
            description="Model weights dtype; scores are float32 (the reference runs fp32 weights under CUDA fp16 autocast).",
        )
        batch_size: int = Field(16, ge=1, description="Image-prompt pairs per forward pass.")
        offline: bool = Field(
            False, description="Never contact the hub (HF_HUB_OFFLINE=1 does the same); weights must be cached or local."
        )
        allow_pickle: bool = Field(
            False,
            description="If torch.load(weights_only=True) refuses the checkpoint, unpickle it fully; only for files you trust.",
        )

    def __init__(self, config: Config | None = None, *, model: Any = None, tokenizer: Any = None) -> None:
        self.config = config if config is not None else self.Config()
        self.scorer: HPSScorer = build_scorer(self.config, what=f"HPS {self.version}", model=model, tokenizer=tokenizer)

    @classmethod
    def from_modules(cls, model: Any, config: Config | None = None, tokenizer: Any = None) -> "HPSv2Reward":
        """Wrap an in-memory hpsv2 open_clip model (tests, custom checkpoints)."""
        return cls(config, model=model, tokenizer=tokenizer)

    @classmethod
    def contract_instance(cls) -> "HPSv2Reward":
        """A tiny random-weight instance for the core contract tests (offline, CPU)."""
        from densegrpo_hps.testing import tiny_hps

        return tiny_hps(cls)

    def score(self, images: Tensor, prompts: list[str]) -> Tensor:
        """Like ``__call__`` but keeps gradients: ``(N,3,H,W)``, ``N`` prompts -> ``(N,)``."""
        return self.scorer.score(images, prompts)

    def __call__(self, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]) -> Tensor:
        """``images (N,3,H,W)`` float32 in [0,1] -> ``(N,)`` float32 HPS scores."""
        with torch.no_grad():
            return self.scorer.score(images, prompts)
