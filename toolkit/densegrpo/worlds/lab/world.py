"""The credit-assignment lab's data model: a d-dimensional latent whose every coordinate is a
sum of binary choices made at different noise levels.

Each coordinate of a clean latent is drawn independently::

    x0_j = sum_l a_l s_lj + noise_std * z_j,   s_lj in {-1, +1} uniform,   z_j ~ N(0, 1)

with geometric amplitudes ``a = (2, 0.5, 0.125)``. On the rectified-flow path
``x_t = (1 - t) x0 + t eps`` (SD3's convention, ``t = sigma``) the level-l choice is buried
once the noise ``t`` is large beside ``(1 - t) a_l``, so the coarse choice ``s_0`` is made at
high noise and the detail ``s_2`` at low noise: :func:`decision_time` is where
``(1 - t) a_l = t``, which reads 0.67, 0.33 and 0.11.

Every ``x0_j`` is a 1-D Gaussian mixture of ``2^L`` components, so everything the lab needs is in
closed form: the exact flow-matching velocity ``E[eps - x0 | x_t]`` (the base policy, sampled by
an ODE it draws the data distribution exactly) and the posterior of each choice given ``x0``
(the reward). Prompts name a pattern ``"pattern k"``, whose target signs are a fixed random
draw seeded by ``k``; a reward asks the choices of one level to match them.
"""

from __future__ import annotations

import itertools
import re

import torch
from torch import Tensor

AMPLITUDES = (2.0, 0.5, 0.125)
"""Amplitude ``a_l`` of each level's choice, coarse (l = 0) to detail (l = 2)."""

NOISE_STD = 0.03
"""Standard deviation of the Gaussian within each mixture component (keeps the density smooth)."""

DECODE_SCALE = 4.0
"""Images are ``sigmoid(x0 / DECODE_SCALE)``: invertible, and inside [0, 1] for any latent."""

PROMPT = re.compile(r"^\s*pattern\s+(\d+)\s*$")


def decision_time(level: int) -> float:
    """The noise level ``t`` at which level ``level``'s choice is as large as the noise: ``(1 - t) a_l = t``."""
    amplitude = AMPLITUDES[level]
    return amplitude / (1.0 + amplitude)


def component_signs() -> Tensor:
    """``(K, L)`` float32: the ``K = 2^L`` sign combinations ``s``, one row per mixture component."""
    return torch.tensor(list(itertools.product((-1.0, 1.0), repeat=len(AMPLITUDES))), dtype=torch.float32)


def component_means() -> Tensor:
    """``(K,)`` float32: each component's mean ``sum_l a_l s_l``."""
    return component_signs() @ torch.tensor(AMPLITUDES, dtype=torch.float32)


def _component_posterior(x: Tensor, scale: Tensor, variance: Tensor) -> Tensor:
    """``(..., K)`` posterior weights of the components given ``x (...)``, where component ``k``
    puts ``x ~ N(scale * mu_k, variance)`` (``scale`` and ``variance`` broadcast to ``x``)."""
    mu = component_means().to(x.device, torch.float64)
    x64, scale64, var64 = x.double()[..., None], scale.double()[..., None], variance.double()[..., None]
    logits = -((x64 - scale64 * mu) ** 2) / (2 * var64)  # equal priors 2^-L and equal variances: both cancel
    return torch.softmax(logits, dim=-1)


def velocity(x: Tensor, t: Tensor) -> Tensor:
    """Exact flow-matching velocity ``E[eps - x0 | x_t = x]`` of the lab's data.

    Args:
        x: ``(N, ...)`` latents at noise level ``t``.
        t: ``(N,)`` noise levels in [0, 1].

    Returns:
        ``(N, ...)`` float32. Per component ``k`` (mean ``mu_k``, variance ``s^2``) the path has
        ``x_t ~ N((1 - t) mu_k, V)`` with ``V = (1 - t)^2 s^2 + t^2``, and
        ``E[eps | x_t, k] = t (x_t - (1 - t) mu_k) / V``,
        ``E[x0 | x_t, k] = mu_k + (1 - t) s^2 (x_t - (1 - t) mu_k) / V``; the velocity is their
        difference averaged over the component posterior. Finite at ``t = 0`` and ``t = 1``.
    """
    shape = (-1,) + (1,) * (x.dim() - 1)
    t = t.to(x.device, torch.float64).reshape(shape).expand_as(x)
    keep = 1.0 - t
    variance = keep**2 * NOISE_STD**2 + t**2
    weights = _component_posterior(x, keep, variance)  # (N, ..., K)
    mu = component_means().to(x.device, torch.float64)
    residual = x.double()[..., None] - keep[..., None] * mu
    eps_hat = t[..., None] * residual / variance[..., None]
    x0_hat = mu + keep[..., None] * NOISE_STD**2 * residual / variance[..., None]
    return ((eps_hat - x0_hat) * weights).sum(-1).float()


def sample_data(count: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """``(count, dim)`` float32 clean latents drawn from the data model."""
    signs = torch.randint(0, 2, (count, dim, len(AMPLITUDES)), generator=generator).float() * 2 - 1
    noise = torch.randn(count, dim, generator=generator)
    return signs @ torch.tensor(AMPLITUDES) + NOISE_STD * noise


def choice_posterior(x0: Tensor, level: int) -> Tensor:
    """``P(s_level = +1 | x0)`` elementwise, ``x0 (...)`` -> ``(...)`` float32."""
    weights = _component_posterior(x0, torch.ones_like(x0), torch.full_like(x0, NOISE_STD**2))
    plus = (component_signs()[:, level] > 0).to(x0.device, weights.dtype)
    return (weights * plus).sum(-1).float()


def pattern_index(prompt: str) -> int:
    """``k`` of the prompt ``"pattern k"``; anything else is a ValueError naming the format."""
    match = PROMPT.match(prompt)
    if match is None:
        raise ValueError(f"lab prompts read 'pattern K' with K a non-negative integer, got {prompt!r}")
    return int(match.group(1))


def pattern_signs(prompt: str, dim: int) -> Tensor:
    """``(dim,)`` float32 target signs in {-1, +1} of ``"pattern k"``: a fixed draw seeded by ``k``,
    the same on every machine, so a held-out pattern is new to the policy."""
    generator = torch.Generator().manual_seed(pattern_index(prompt))
    return torch.randint(0, 2, (dim,), generator=generator).float() * 2 - 1


def encode_image(x0: Tensor) -> Tensor:
    """Clean latents ``(N, 1, 1, d)`` -> images ``(N, 3, 1, d)`` in (0, 1), the same row in each channel."""
    return torch.sigmoid(x0.float() / DECODE_SCALE).expand(-1, 3, -1, -1).contiguous()


def decode_image(images: Tensor) -> Tensor:
    """Images ``(N, 3, 1, d)`` -> latents ``(N, d)``, the inverse of :func:`encode_image` (mean of the channels)."""
    pixels = images.float().mean(1).flatten(1).clamp(1e-6, 1 - 1e-6)
    return DECODE_SCALE * torch.logit(pixels)


__all__ = [
    "AMPLITUDES",
    "DECODE_SCALE",
    "NOISE_STD",
    "choice_posterior",
    "component_means",
    "component_signs",
    "decision_time",
    "decode_image",
    "encode_image",
    "pattern_index",
    "pattern_signs",
    "sample_data",
    "velocity",
]
