"""A policy for a model that diffusers has: an SD3-style transformer through densegrpo's shared adapter."""

from __future__ import annotations

import torch
from pydantic import Field
from torch import Tensor, nn

from densegrpo.api import Cond, FlowModelParts, FlowPolicyConfig, FlowTransformerPolicy, LoRAConfig, sd3_transformer_forward


class TinyDiTPolicy(FlowTransformerPolicy):
    """A tiny random ``SD3Transformer2DModel`` over latents ``(4, 16, 16)``; images ``(N, 3, 32, 32)``.

    The adapter gives it the prompt cache, CFG, float32 step maths, peft LoRA, the reference with
    the adapter disabled and LoRA files in ``StableDiffusion3Pipeline``'s format.
    """

    class Config(FlowPolicyConfig):
        guidance_scale: float = Field(1.0, ge=0, description="CFG scale; <= 1 disables it.")
        lora: LoRAConfig = Field(default_factory=lambda: LoRAConfig(rank=4, alpha=8.0), description="LoRA settings (peft).")

    def __init__(self, config: Config | None = None):
        from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

        config = config or self.Config()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            transformer = SD3Transformer2DModel(
                sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
                num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16, pooled_projection_dim=16,
            )
            text_encoder = nn.Embedding(256, 16).requires_grad_(False)
            to_rgb = nn.Conv2d(4, 3, 1).requires_grad_(False)

        def encode(prompts: list[str]) -> Cond:
            """Bytes -> ``prompt_embeds (N, 8, 16)`` and their mean ``pooled_embeds (N, 16)``."""
            ids = torch.tensor([(list(p.encode()) + [0] * 8)[:8] for p in prompts], device=config.device)
            embeds = text_encoder(ids)
            return Cond(prompt_embeds=embeds, pooled_embeds=embeds.mean(1), prompts=list(prompts))

        def decode(latents: Tensor) -> Tensor:
            """``(N, 4, 16, 16)`` -> ``(N, 3, 32, 32)`` in [0, 1]."""
            return nn.functional.interpolate(torch.sigmoid(to_rgb(latents.float())), scale_factor=2)

        parts = FlowModelParts(
            transformer=transformer, encode=encode, forward=sd3_transformer_forward, decode=decode,
            latent_shape=(4, 16, 16), lora_pipeline=StableDiffusion3Pipeline, frozen_modules=(text_encoder, to_rgb),
        )
        super().__init__(parts, config)
