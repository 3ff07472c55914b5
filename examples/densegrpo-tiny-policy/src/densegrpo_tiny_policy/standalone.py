"""A policy whose model is not in diffusers: a flow-matching MLP over 3 x 8 x 8 pixels, in plain torch."""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from densegrpo.api import Cond


class TinyFlowPolicy:
    """Velocity ``v(x, sigma, c) = base(x, sigma, c) + delta(x, sigma, c)``: ``base`` frozen, ``delta`` trained
    (its last layer starts at zero, so training starts at the base model, as LoRA does).

    Latents ``(3, 8, 8)`` pixels in [-1, 1]; ``decode`` upsamples them to images ``(N, 3, 32, 32)`` in [0, 1].
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        device: str = Field("cpu", description="Torch device, e.g. 'cpu' or 'cuda'.")
        hidden: int = Field(64, ge=8, description="Width of the velocity MLP.")
        seed: int = Field(0, description="Seed of the random weights.")

    def __init__(self, config: Config | None = None):
        self.config = config or self.Config()
        self.device = torch.device(self.config.device)
        self.latent_shape = (3, 8, 8)
        width, text = self.config.hidden, 16
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.text_encoder = nn.Embedding(256, text).requires_grad_(False)  # mean of byte embeddings
            self.base = nn.Sequential(nn.Linear(192 + 1 + text, width), nn.SiLU(), nn.Linear(width, 192))
        self.base.requires_grad_(False)
        self.delta = copy.deepcopy(self.base).requires_grad_(True)
        nn.init.zeros_(self.delta[2].weight)
        nn.init.zeros_(self.delta[2].bias)
        for module in (self.text_encoder, self.base, self.delta):
            module.to(self.device)
        self._reference = False

    def encode(self, prompts: list[str]) -> Cond:
        """``N`` prompts -> ``Cond(prompt_embeds (N, 1, 16))``."""
        rows = [self.text_encoder(torch.tensor(list(p.encode())[:64] or [0], device=self.device)).mean(0) for p in prompts]
        return Cond(prompt_embeds=torch.stack(rows)[:, None], prompts=list(prompts))

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """``x (N, 3, 8, 8)``, ``sigma (N,)`` -> float32 velocity ``(N, 3, 8, 8)``."""
        inputs = torch.cat([x.flatten(1), sigma[:, None], cond.prompt_embeds[:, 0]], dim=1).float()
        v = self.base(inputs)
        if not self._reference:
            v = v + self.delta(inputs)
        return v.view_as(x)

    def decode(self, x0: Tensor) -> Tensor:
        """``(N, 3, 8, 8)`` -> images ``(N, 3, 32, 32)`` float32 in [0, 1]."""
        images = (x0.float().clamp(-1, 1) + 1) / 2
        return nn.functional.interpolate(images, scale_factor=4, mode="nearest")

    def trainable_parameters(self) -> list[nn.Parameter]:
        return list(self.delta.parameters())

    @contextmanager
    def reference(self):
        """The frozen base model, for the KL term."""
        self._reference = True
        try:
            yield self
        finally:
            self._reference = False

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {name: t.detach().cpu().clone() for name, t in self.delta.state_dict().items()}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        self.delta.load_state_dict(state)
