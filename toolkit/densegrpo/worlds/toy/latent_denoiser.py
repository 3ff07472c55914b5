"""The latent toy's flow model: a residual MLP over a ``(C, 4, 4)`` autoencoder latent.

The velocity ``v(x, sigma, c)`` of the flattened latent (64 numbers at C = 4) comes from
``num_blocks`` residual MLP blocks of width ``hidden``; each block's pre-norm is modulated (scale,
shift: adaLN, as in DiT and SD3's MMDiT) by ``silu(embed(1000 sigma) + W pooled)``, where
``pooled`` is the toy text encoder's pooled prompt embedding. One call costs about 1.6 M
multiply-adds per sample at the default width, some 150x less than the 16 px pixel toy's UNet.

LoRA targets: ``fc1`` and ``fc2`` of every block (the layers that carry the features, as the
attention projections do in the pixel toy). A ``diffusers`` ``ModelMixin`` / ``ConfigMixin`` /
``PeftAdapterMixin``, so peft LoRA attaches as on diffusers' own denoisers.
"""

from __future__ import annotations

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.loaders import PeftAdapterMixin
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn


class ModulatedBlock(nn.Module):
    """``h + fc2(silu(fc1(norm(h) * (1 + scale) + shift)))`` with ``(scale, shift)`` from the conditioning."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.modulation = nn.Linear(hidden, 2 * hidden)
        self.fc1 = nn.Linear(hidden, 2 * hidden)
        self.fc2 = nn.Linear(2 * hidden, hidden)
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, h: Tensor, condition: Tensor) -> Tensor:
        scale, shift = self.modulation(condition).chunk(2, dim=-1)
        return h + self.fc2(nn.functional.silu(self.fc1(self.norm(h) * (1 + scale) + shift)))


class ToyLatentDenoiser(ModelMixin, ConfigMixin, PeftAdapterMixin):
    """``forward(x (N,C,S,S), sigma (N,) in [0,1], pooled (N,P)) -> velocity (N,C,S,S)``."""

    @register_to_config
    def __init__(self, latent_channels: int = 4, latent_size: int = 4, hidden: int = 256, num_blocks: int = 4,
                 pooled_dim: int = 64, time_dim: int = 128):
        super().__init__()
        features = latent_channels * latent_size * latent_size
        self.time_embed = nn.Sequential(nn.Linear(time_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.text_embed = nn.Linear(pooled_dim, hidden)
        self.proj_in = nn.Linear(features, hidden)
        self.layers = nn.ModuleList(ModulatedBlock(hidden) for _ in range(num_blocks))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False)
        self.proj_out = nn.Linear(hidden, features)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: Tensor, sigma: Tensor, pooled: Tensor) -> Tensor:
        frequencies = get_timestep_embedding(sigma.float() * 1000.0, self.config.time_dim, flip_sin_to_cos=True,
                                             downscale_freq_shift=0)
        condition = nn.functional.silu(self.time_embed(frequencies.to(x.dtype)) + self.text_embed(pooled.to(x.dtype)))
        h = self.proj_in(x.flatten(1))
        for block in self.layers:
            h = block(h, condition)
        return self.proj_out(self.norm_out(h)).view_as(x)


__all__ = ["ModulatedBlock", "ToyLatentDenoiser"]
