"""Per-sample noise derived from (seed, iteration, global sample index).

Every sample's initial noise and per-step SDE noise come from its own generator, seeded
from those three numbers alone, so the same global batch gives the same samples whatever
the world size, and a resumed run draws exactly what the uninterrupted run would have.
"""

from __future__ import annotations

import numpy as np
import torch


def sample_seed(*keys: int) -> int:
    """A well-mixed 63-bit seed from integer keys (numpy's SeedSequence)."""
    low, high = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in keys]).generate_state(2, np.uint32)
    return (int(low) | (int(high) << 32)) & 0x7FFFFFFFFFFFFFFF


def generator_for(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(sample_seed(*keys))


def draw_noise(
    seed: int,
    iteration: int,
    global_indices: list[int],
    latent_shape: tuple[int, int, int],
    num_steps: int,
    *,
    group_size: int | None = None,
    stream: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial noise ``(n, C, h, w)`` and step noise ``(n, T, C, h, w)`` for the given samples.

    ``group_size`` set: members of a prompt group share the initial noise (step noise
    stays per sample). ``stream`` separates uses (training, calibration, evaluation).
    """
    initial, steps = [], []
    for index in global_indices:
        noise_key = index // group_size if group_size else index
        initial.append(torch.randn(latent_shape, generator=generator_for(seed, stream, iteration, 0, noise_key)))
        steps.append(torch.randn((num_steps, *latent_shape), generator=generator_for(seed, stream, iteration, 1, index)))
    return torch.stack(initial), torch.stack(steps)
