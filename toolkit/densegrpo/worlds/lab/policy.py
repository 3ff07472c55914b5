"""``lab``: the credit-assignment lab's flow policy, a d-dimensional latent with a closed-form base.

The base velocity is the exact flow-matching velocity of the lab's data
(:func:`densegrpo.worlds.lab.world.velocity`), so the reference model samples the data distribution
without any training and costs a few tensor operations per step. On top sits a small trainable
residual, zero at the start, that reads each coordinate ``x_j``, the prompt's target sign
``tau_j`` and the noise level ``t``; the same weights serve every coordinate, so the policy
generalises to patterns it never trained on and its size does not change with ``d``. The
latent is ``(1, 1, d)``; ``decode`` writes ``sigmoid(x0 / 4)`` into a ``(3, 1, d)`` image
(:func:`densegrpo.worlds.lab.world.encode_image`), which the ``lab`` reward inverts.

It runs through the same :class:`~densegrpo.components.policies.adapter.FlowTransformerPolicy` as every
other policy: prompt cache, CFG (the empty prompt has target 0), the frozen reference, full
fine-tuning by default or peft LoRA on the residual's layers.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.modeling_utils import ModelMixin
from pydantic import Field
from torch import Tensor, nn

from densegrpo.components.policies.adapter import (
    FlowModelParts,
    FlowPolicyConfig,
    FlowTransformerPolicy,
    LoRAConfig,
    resolve_dtype,
)
from densegrpo.contracts.protocols import Cond
from densegrpo.worlds.lab import world

LAB_LORA_TARGETS = ("hidden.0", "hidden.2", "out")
"""The residual's linear layers, for ``lora.enabled: true``."""

TIME_FREQUENCIES = 3
"""Sine/cosine features of the noise level the residual reads, beside ``t`` itself."""


class LabVelocity(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """``v = velocity(x, t) + residual(x_j, tau_j, t)``: the exact base plus a pointwise MLP.

    ``forward(x (N,1,1,d), sigma (N,), targets (N,d)) -> (N,1,1,d)``. The residual's output
    layer starts at zero, so the untrained model is exactly the closed-form base. A diffusers
    model, so that peft LoRA and LoRA files work as for the other policies.
    """

    @register_to_config
    def __init__(self, width: int = 64):
        super().__init__()
        features = 3 + 1 + 2 * TIME_FREQUENCIES  # x, tau, x * tau, t, sin/cos(k pi t)
        self.hidden = nn.Sequential(nn.Linear(features, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU())
        self.out = nn.Linear(width, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: Tensor, sigma: Tensor, targets: Tensor) -> Tensor:
        n, d = x.shape[0], x.shape[-1]
        flat = x.reshape(n, d).float()
        t = sigma.float().reshape(n, 1).expand(n, d)
        tau = targets.float().reshape(n, d)
        k = torch.arange(1, TIME_FREQUENCIES + 1, dtype=torch.float32, device=x.device)
        phase = math.pi * t[..., None] * k
        features = torch.cat([flat[..., None], tau[..., None], (flat * tau)[..., None], t[..., None], phase.sin(), phase.cos()], -1)
        residual = self.out(self.hidden(features)).squeeze(-1)  # (N, d)
        base = world.velocity(flat, sigma.float())
        return (base + residual).reshape(x.shape)


def lab_forward(model: nn.Module, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
    """``x (N,1,1,d)``, ``sigma (N,)`` -> velocity ``(N,1,1,d)``; the targets are ``cond.prompt_embeds[:, 0]``."""
    return model(x, sigma, cond.prompt_embeds[:, 0])


def encode_lab_prompts(prompts: list[str], dim: int, dtype: torch.dtype) -> Cond:
    """``"pattern k"`` prompts -> ``Cond(prompt_embeds (N, 1, d))`` holding each pattern's target
    signs; the empty prompt (the CFG negative) has target 0."""
    rows = [torch.zeros(dim) if not p.strip() else world.pattern_signs(p, dim) for p in prompts]
    embeds = torch.stack(rows)[:, None, :].to(dtype) if rows else torch.zeros(0, 1, dim, dtype=dtype)
    return Cond(prompt_embeds=embeds, prompts=list(prompts))


class LabPolicy(FlowTransformerPolicy):
    """The lab world's policy: latent ``(1, 1, d)``, images ``(N, 3, 1, d)``."""

    class Config(FlowPolicyConfig):
        """Lab policy options; the shared fields are those of every diffusers policy."""

        dim: int = Field(16, ge=1, le=4096, description="Latent dimension d: noise dimensions of each sample (the lab's main dial).")
        width: int = Field(64, ge=4, description="Hidden width of the residual MLP (the same weights serve every coordinate).")
        guidance_scale: float = Field(1.0, ge=0, description="CFG scale against the empty prompt (target 0); 1 leaves it off.")
        negative_prompt: str = Field("", description="The CFG negative prompt; the empty prompt has target 0.")
        lora: LoRAConfig = Field(
            default_factory=lambda: LoRAConfig(enabled=False, rank=4, alpha=8.0),
            description="Off by default: the residual (a few thousand weights) is trained whole; enable for LoRA on its layers.",
        )

    @classmethod
    def contract_prompts(cls) -> list[str]:
        """The prompts the registry-wide contract test encodes: the lab reads only ``"pattern k"``."""
        return ["pattern 0", "pattern 1"]

    def __init__(self, config: Config | None = None):
        config = config if config is not None else self.Config()
        from diffusers import StableDiffusion3Pipeline

        dtype = resolve_dtype(config.dtype)
        dim = int(config.dim)
        parts = FlowModelParts(
            transformer=LabVelocity(config.width),
            encode=lambda prompts: encode_lab_prompts(prompts, dim, dtype),
            forward=lab_forward,
            decode=lambda latents: world.encode_image(latents),
            latent_shape=(1, 1, dim),
            lora_pipeline=StableDiffusion3Pipeline,
            lora_prefix="transformer",
            default_lora_targets=LAB_LORA_TARGETS,
        )
        super().__init__(parts, config)


__all__ = ["LAB_LORA_TARGETS", "LabPolicy", "LabVelocity", "encode_lab_prompts", "lab_forward"]
