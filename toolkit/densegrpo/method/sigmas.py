"""The sigma grid shared by rollouts, the dense-reward engine and calibrators.

The grid is the one Stable Diffusion 3 (and Flow-GRPO, DenseGRPO) sample on: diffusers'
``FlowMatchEulerDiscreteScheduler(shift=...)`` after ``set_timesteps(T)`` with no custom
sigmas, which is what ``StableDiffusion3Pipeline.__call__`` does through
``retrieve_timesteps``. It is

    u_i   = linspace(1, sigma_min, T),   sigma_min = shift(1 / 1000) of the training grid
    sigma = shift * u / (1 + (shift - 1) * u)                           (method.md section 1)

followed by a terminal ``0``: ``sigmas (T+1,)`` from exactly 1 down to exactly 0.
"""

from __future__ import annotations

import torch
from torch import Tensor


def make_sigmas(num_steps: int, shift: float = 3.0) -> Tensor:
    """Return the shifted flow-matching grid ``sigmas (T+1,)`` float32, 1 -> 0.

    Args:
        num_steps: ``T``, the number of sampling steps (10 for training, 40 for evaluation
            in Flow-GRPO / DenseGRPO).
        shift: the timestep shift of SD3's scheduler config (3.0 for SD3 / SD3.5).

    Raises:
        ValueError: if ``num_steps < 1`` or ``shift <= 0``.
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}; use e.g. 10.")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift!r}; SD3 uses 3.0.")
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=float(shift))
    scheduler.set_timesteps(int(num_steps))
    sigmas = scheduler.sigmas.detach().to("cpu", torch.float32).clone()
    if sigmas.shape != (num_steps + 1,):  # pragma: no cover - guards a diffusers change
        raise RuntimeError(f"diffusers returned {tuple(sigmas.shape)} sigmas for {num_steps} steps")
    # shift * 1 / (1 + (shift - 1)) is 1 up to float rounding for non-integer shifts: pin the ends.
    if abs(float(sigmas[0]) - 1.0) > 1e-5 or float(sigmas[-1]) != 0.0:  # pragma: no cover
        raise RuntimeError(f"unexpected sigma grid ends {float(sigmas[0])}, {float(sigmas[-1])}")
    sigmas[0] = 1.0
    if not bool((sigmas[1:] < sigmas[:-1]).all()):  # pragma: no cover
        raise RuntimeError("diffusers returned a sigma grid that is not strictly decreasing")
    return sigmas


__all__ = ["make_sigmas"]
