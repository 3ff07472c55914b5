"""Step maths shared by the built-in samplers (method.md section 1).

Every built-in sampler moves ``x_k -> x_{k+1}`` with a Gaussian transition

    x_{k+1} = mean_k(x_k, v_k) + step_std_k * eps,   eps ~ N(0, I)

whose std ``step_std_k`` depends only on the grid and the noise level (never on ``x``), so
it is computed for all steps up front. A step with ``step_std_k == 0`` is the Euler ODE
step ``x + v * dt`` and carries no log-prob (``0`` by the :class:`Trajectory` contract).
A sampler is therefore two small functions, ``transition_std`` and ``sde_mean``; the
rollout loop and the log-prob recomputation below are shared, so both use literally the
same float32 code and the first-inner-step ratio is exactly 1.

All maths here is float32, whatever the model's dtype: velocities are cast on arrival.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from densegrpo.protocols import Cond, Policy, Trajectory

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# sde_mean(x, v, sigma, sigma_next, noise_level, sigma_cap) -> mean (N,C,h,w); the scalars
# are 0-d float32 tensors, sigma_cap is the largest grid sigma below 1 (see flow_sde_std).
SDEMean = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]


def check_grid(sigmas: Tensor, noise_level: Tensor | None = None) -> None:
    """Raise ValueError unless ``sigmas (T+1,)`` decreases strictly from <= 1 to exactly 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor of T+1 >= 2 values, got shape {tuple(sigmas.shape)}; "
            "build it with densegrpo.sigmas.make_sigmas(T)."
        )
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[0]) > 1.0 or float(sigmas[-1]) != 0.0:
        raise ValueError(
            "sigmas must decrease strictly from at most 1 to exactly 0; "
            "build them with densegrpo.sigmas.make_sigmas(T)."
        )
    if noise_level is not None:
        num_steps = sigmas.numel() - 1
        if noise_level.shape != (num_steps,):
            raise ValueError(
                f"noise_level must have one value per step, shape ({num_steps},), got "
                f"{tuple(noise_level.shape)}; use torch.full(({num_steps},), a) for a constant level."
            )
        if not bool(torch.isfinite(noise_level).all()) or bool((noise_level < 0).any()):
            raise ValueError("noise_level must be finite and >= 0 at every step; Flow-GRPO uses 0.7.")


def sigma_cap(sigmas: Tensor) -> Tensor:
    """The largest grid sigma strictly below 1 (0-d), used in place of 1 - sigma = 0."""
    below = sigmas[sigmas < 1.0]
    return below.max()


def euler_mean(x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """ODE (Euler) step: ``x + v * dt`` with ``dt = sigma_next - sigma < 0``."""
    return x + v * (sigma_next - sigma)


def flow_sde_std(sigma: Tensor, noise_level: Tensor, cap: Tensor) -> Tensor:
    """Flow-GRPO's ``std_t = a * sqrt(sigma / (1 - sigma))``; at ``sigma == 1`` the
    denominator uses ``1 - cap`` (the largest grid sigma below 1), as Flow-GRPO does."""
    denominator_sigma = torch.where(sigma >= 1.0, cap, sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denominator_sigma))


def flow_sde_mean(
    x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: Tensor, cap: Tensor
) -> Tensor:
    """Flow-GRPO mean: ``x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] * dt``."""
    std_t = flow_sde_std(sigma, noise_level, cap)
    dt = sigma_next - sigma
    return x + (v + std_t**2 / (2.0 * sigma) * (x + (1.0 - sigma) * v)) * dt


def cps_std(sigma_next: Tensor, noise_level: Tensor) -> Tensor:
    """Coefficient-preserving sampling: ``std_t = sigma_next * sin(a * pi / 2)``."""
    return sigma_next * torch.sin(noise_level * (math.pi / 2.0))


def cps_mean(
    x: Tensor, v: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: Tensor, cap: Tensor
) -> Tensor:
    """CPS mean: ``(x - sigma v)(1 - sigma_next) + (x + (1 - sigma) v) sqrt(sigma_next^2 - std_t^2)``.

    ``x - sigma v`` is the clean estimate and ``x + (1 - sigma) v`` the noise estimate of
    the rectified-flow interpolation; ``cap`` is unused.
    """
    del cap
    std_t = cps_std(sigma_next, noise_level)
    x0_hat = x - sigma * v
    eps_hat = x + (1.0 - sigma) * v
    return x0_hat * (1.0 - sigma_next) + eps_hat * torch.sqrt(
        torch.clamp(sigma_next**2 - std_t**2, min=0.0)
    )


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: Tensor) -> Tensor:
    """``log N(x_next; mean, std^2 I)`` averaged over every non-batch dim -> ``(N,)`` float32."""
    std = std.to(torch.float32)
    z = (x_next.to(torch.float32) - mean) / std
    density = -0.5 * z**2 - torch.log(std) - LOG_SQRT_2PI
    return density.flatten(1).mean(dim=1)


def velocity_f32(policy: Policy, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
    """``policy.velocity`` at one grid sigma for the whole batch, cast to float32."""
    sigma_batch = sigma.to(torch.float32).expand(x.shape[0]).contiguous()
    v = policy.velocity(x, sigma_batch, cond)
    if v.shape != x.shape:
        raise ValueError(
            f"policy.velocity returned shape {tuple(v.shape)} for input {tuple(x.shape)}; "
            "a velocity must have the latent's shape (N, C, h, w)."
        )
    return v.to(torch.float32)


def draw_step_noise(
    shape: tuple[int, ...],
    device: torch.device,
    step_noise: Tensor | None,
    generator: torch.Generator | None,
) -> Tensor:
    """``(N,T,C,h,w)`` float32 Gaussian draws, given or from ``generator`` (drawn on its device)."""
    if step_noise is not None:
        if tuple(step_noise.shape) != shape:
            raise ValueError(
                f"step_noise must have shape (N,T,C,h,w) = {shape}, got {tuple(step_noise.shape)}."
            )
        return step_noise.to(device=device, dtype=torch.float32)
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=torch.float32).to(device)


def gaussian_rollout(
    policy: Policy,
    cond: Cond,
    noise: Tensor,
    sigmas: Tensor,
    noise_level: Tensor,
    step_std: Tensor,
    sde_mean: SDEMean,
    *,
    step_noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Run ``T`` Gaussian transitions from ``noise (N,C,h,w)`` and record everything.

    Args:
        step_std: ``(T,)`` float32, the transition std of every step (``0`` = Euler step).
        sde_mean: the stochastic steps' mean function (see :data:`SDEMean`).

    Returns:
        a :class:`Trajectory`; ``trained_steps[:, k] = step_std[k] > 0``.
    """
    device = torch.device(policy.device) if not isinstance(policy.device, torch.device) else policy.device
    if noise.ndim != 4:
        raise ValueError(f"noise must be (N, C, h, w), got shape {tuple(noise.shape)}.")
    if len(cond) != noise.shape[0]:
        raise ValueError(
            f"cond has {len(cond)} rows but noise has {noise.shape[0]}; encode one prompt per sample."
        )
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    noise_level = noise_level.to(device=device, dtype=torch.float32)
    step_std = step_std.to(device=device, dtype=torch.float32)
    num_samples, num_steps = noise.shape[0], sigmas.numel() - 1
    cap = sigma_cap(sigmas)
    stochastic = step_std > 0

    with torch.no_grad():
        x = noise.to(device=device, dtype=torch.float32)
        draws = None
        if bool(stochastic.any()):
            draws = draw_step_noise(
                (num_samples, num_steps, *x.shape[1:]), device, step_noise, generator
            )
        latents = [x]
        means, velocities, log_probs = [], [], []
        for k in range(num_steps):
            sigma, sigma_next = sigmas[k], sigmas[k + 1]
            v = velocity_f32(policy, x, sigma, cond)
            if bool(stochastic[k]):
                mean = sde_mean(x, v, sigma, sigma_next, noise_level[k], cap)
                x_next = mean + step_std[k] * draws[:, k]
                log_prob = gaussian_log_prob(x_next, mean, step_std[k])
            else:
                mean = euler_mean(x, v, sigma, sigma_next)
                x_next = mean
                log_prob = torch.zeros(num_samples, device=device, dtype=torch.float32)
            latents.append(x_next)
            means.append(mean)
            velocities.append(v)
            log_probs.append(log_prob)
            x = x_next

    return Trajectory(
        latents=torch.stack(latents, dim=1),
        log_probs=torch.stack(log_probs, dim=1),
        means=torch.stack(means, dim=1),
        velocities=torch.stack(velocities, dim=1),
        sigmas=sigmas,
        noise_level=noise_level,
        step_std=step_std,
        trained_steps=stochastic.unsqueeze(0).expand(num_samples, num_steps).clone(),
        cond=cond,
    )


def gaussian_step_log_prob(
    policy: Policy, traj: Trajectory, step: int, sde_mean: SDEMean
) -> tuple[Tensor, Tensor]:
    """Recompute step ``k``'s ``(log_prob (N,), mean (N,C,h,w))`` with gradients.

    Uses the trajectory's recorded ``step_std`` and ``noise_level``, so it is the rollout's
    exact computation with the current weights. Deterministic steps return a zero log-prob
    that is still attached to the graph (with zero gradient).
    """
    num_steps = traj.num_steps
    if not 0 <= int(step) < num_steps:
        raise ValueError(f"step must be in [0, {num_steps}), got {step}.")
    k = int(step)
    sigmas = traj.sigmas.to(torch.float32)
    sigma, sigma_next = sigmas[k], sigmas[k + 1]
    x = traj.latents[:, k].to(torch.float32)
    v = velocity_f32(policy, x, sigma, traj.cond)
    std = traj.step_std[k].to(torch.float32)
    if float(std) > 0:
        mean = sde_mean(x, v, sigma, sigma_next, traj.noise_level[k].to(torch.float32), sigma_cap(sigmas))
        return gaussian_log_prob(traj.latents[:, k + 1], mean, std), mean
    mean = euler_mean(x, v, sigma, sigma_next)
    return 0.0 * mean.flatten(1).sum(dim=1), mean


__all__ = [
    "check_grid",
    "cps_mean",
    "cps_std",
    "draw_step_noise",
    "euler_mean",
    "flow_sde_mean",
    "flow_sde_std",
    "gaussian_log_prob",
    "gaussian_rollout",
    "gaussian_step_log_prob",
    "sigma_cap",
    "velocity_f32",
]
