"""``toy-latent``: the toy world as a small SD3: autoencoder, flow model, CLIP text encoder.

The pixel toy (``toy``) denoises 768 or 3072 pixel values with a UNet; its score-function
gradient fights that many noise dimensions and buys about 5 samples per second on two CPU
cores (docs/toy-alignment.md). This toy draws the same scenes through a latent of shape
``(4, 4, 4)`` (64 numbers):

- :class:`~densegrpo.worlds.toy.autoencoder.ToyAutoencoder` plays SD3's VAE: ``decode`` maps the
  flow model's clean latent to a 32 x 32 image for the rewards;
- :class:`~densegrpo.worlds.toy.latent_denoiser.ToyLatentDenoiser`, a residual MLP with adaLN, plays
  the MMDiT and is the module that gets LoRA (:data:`TOY_LATENT_LORA_TARGETS`);
- the text encoder is the pixel toy's shipped ``CLIPTextModelWithProjection`` (frozen); the
  denoiser reads its pooled embedding, like SD3's pooled CLIP vector.

It runs through the same :class:`~densegrpo.components.policies.adapter.FlowTransformerPolicy` as ``sd3``,
``flux`` and ``toy``: prompt cache, CFG, peft LoRA, the reference with the adapter disabled,
LoRA files in diffusers' SD3 format (prefix ``transformer``). ``timestep = 1000 * sigma``.
The weights under ``densegrpo/worlds/toy/weights/toy_latent/`` (``denoiser/`` and ``autoencoder/``)
were trained by ``scripts/pretrain_toy_latent.py``.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from densegrpo.components.policies.adapter import (
    FlowModelParts,
    FlowPolicyConfig,
    FlowTransformerPolicy,
    LoRAConfig,
    hub_load,
    resolve_dtype,
)
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Cond
from densegrpo.worlds.toy.policy import (
    _tokenizer,
    build_toy_modules,
    encode_toy_prompts,
)

TOY_LATENT_LORA_TARGETS = ["fc1", "fc2", "modulation", "text_embed", "proj_in", "proj_out"]
"""LoRA targets of the latent toy: both linear layers and the adaLN modulation of every residual
MLP block, the pooled-text projection, and the input and output projections. The prompt reaches
the denoiser only through ``text_embed`` and the modulations (as it reaches SD3's MMDiT through
the text-stream projections that Flow-GRPO adapts), so a LoRA on ``fc1``/``fc2`` alone can hardly
change what the model does with the prompt: with it, the main job's held-out gain after 50
iterations was +0.031 +- 0.008, against +0.066 +- 0.011 with these targets
(docs/toy-alignment.md)."""

TOY_LATENT_LORA = {"rank": 32, "alpha": 64.0}
"""The latent toy's LoRA defaults (Flow-GRPO's r 32, alpha 64), which a partial ``lora`` override keeps.
Measured on the main job (docs/toy-alignment.md): held-out gain after 50 iterations +0.066 at r 8,
+0.098 at r 32, +0.098 at r 64."""

WEIGHTS_FOLDER = "weights/toy_latent"

DECODE_CHUNK = 512
"""Latents per decoder call (the CPU's caches favour a few hundred images at a time)."""


def packaged_latent_weights() -> Path:
    """Folder of the shipped latent-toy weights inside the installed package (``denoiser/``, ``autoencoder/``)."""
    return Path(str(resources.files("densegrpo.worlds.toy").joinpath(WEIGHTS_FOLDER)))


def build_latent_modules(weights: str = "pretrained", folder: str | Path | None = None, seed: int = 0):
    """``(denoiser, autoencoder, text_encoder)``: the shipped weights, a local folder, or a random denoiser.

    ``weights: random`` gives a freshly initialised denoiser beside the shipped autoencoder and
    text encoder (the tests' tiny policy; the decoder then still draws scenes).
    """
    from densegrpo.worlds.toy.autoencoder import ToyAutoencoder
    from densegrpo.worlds.toy.latent_denoiser import ToyLatentDenoiser

    root = Path(folder) if folder is not None else packaged_latent_weights()
    if not (root / "autoencoder" / "config.json").exists() or (weights == "pretrained" and not (root / "denoiser" / "config.json").exists()):
        raise UserError(
            f"latent toy weights are missing in '{root}' (denoiser/ and autoencoder/); reinstall densegrpo, run "
            "scripts/pretrain_toy_latent.py, or set policy config weights: random"
        )
    autoencoder = hub_load(ToyAutoencoder.from_pretrained, "latent toy autoencoder", str(root), subfolder="autoencoder",
                           local_files_only=True, torch_dtype=torch.float32)
    if weights == "random":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            denoiser = ToyLatentDenoiser(latent_channels=autoencoder.config.latent_channels)
    else:
        denoiser = hub_load(ToyLatentDenoiser.from_pretrained, "latent toy denoiser", str(root), subfolder="denoiser",
                            local_files_only=True, torch_dtype=torch.float32)
    _, text_encoder = build_toy_modules("pretrained")
    return denoiser, autoencoder, text_encoder


def denoiser_forward(denoiser: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
    """``x (N,C,4,4)``, ``sigma (N,)`` -> velocity ``(N,C,4,4)``; the denoiser reads the pooled embedding."""
    return denoiser(x, sigma, cond.pooled_embeds)


class ToyLatentPolicy(FlowTransformerPolicy):
    """The latent toy: latent ``(4, 4, 4)``, images ``(N, 3, 32, 32)``."""

    class Config(FlowPolicyConfig):
        """Latent toy options; the shared fields are those of every diffusers policy."""

        weights: Literal["pretrained", "random"] = Field(
            "pretrained", description="'pretrained': the shipped weights (or `model`); 'random': a fresh denoiser (tests)."
        )
        seed: int = Field(0, description="Seed of the random init when weights is 'random'.")
        model: str | None = Field(
            None, description="Local folder with denoiser/ and autoencoder/ (as written by scripts/pretrain_toy_latent.py); "
            "None: the shipped weights."
        )
        guidance_scale: float = Field(
            1.0, ge=0, description="CFG scale; the model was trained with 10% empty prompts so CFG works, but 1 (off) halves the cost."
        )
        lora: LoRAConfig = Field(
            default_factory=lambda: LoRAConfig(**TOY_LATENT_LORA),
            description="LoRA settings: rank 32 (alpha 64) on fc1/fc2 and the modulation of every block, text_embed, proj_in and "
            "proj_out. Fields not given keep these defaults.",
        )

        @field_validator("lora", mode="before")
        @classmethod
        def _latent_lora_defaults(cls, value: Any) -> Any:
            # a partial override such as {"rank": 4} must not fall back to LoRAConfig's other defaults
            return {**TOY_LATENT_LORA, **value} if isinstance(value, dict) else value

    def __init__(self, config: Config | None = None):
        config = config if config is not None else self.Config()
        denoiser, autoencoder, text_encoder = build_latent_modules(config.weights, config.model, config.seed)
        dtype = resolve_dtype(config.dtype)
        text_encoder = text_encoder.to(config.device, dtype)
        # channels-last convolutions and chunks of DECODE_CHUNK images decode about 3x faster on a CPU than one
        # contiguous batch (measured on 2816 latents: 2.15 s -> 0.70 s), and the dense engine decodes every step
        autoencoder = autoencoder.to(config.device, memory_format=torch.channels_last).eval()
        tokenizer = _tokenizer(int(text_encoder.config.max_position_embeddings))
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        from diffusers import StableDiffusion3Pipeline

        def decode(latents: Tensor) -> Tensor:
            with torch.no_grad():
                raw = autoencoder.unscale_latents(latents.float()).contiguous(memory_format=torch.channels_last)
                return torch.cat([autoencoder.decode(chunk) for chunk in raw.split(DECODE_CHUNK)]).contiguous()

        parts = FlowModelParts(
            transformer=denoiser,
            encode=lambda prompts: encode_toy_prompts(tokenizer, text_encoder, prompts, dtype),
            forward=denoiser_forward,
            decode=decode,
            latent_shape=(int(autoencoder.config.latent_channels), 4, 4),
            lora_pipeline=StableDiffusion3Pipeline,
            lora_prefix="transformer",
            default_lora_targets=tuple(TOY_LATENT_LORA_TARGETS),
            frozen_modules=(text_encoder, autoencoder),
        )
        super().__init__(parts, config)


__all__ = ["TOY_LATENT_LORA_TARGETS", "ToyLatentPolicy", "build_latent_modules", "denoiser_forward", "packaged_latent_weights"]
