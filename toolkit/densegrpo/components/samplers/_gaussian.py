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

from densegrpo.contracts.protocols import Cond, Policy, Trajectory

LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)

# sde_mean(x, v, sigma, sigma_next, noise_level, sigma_cap) -> mean (N,C,h,w). The scalars are
# Python floats: the grid and the noise levels are read once per rollout (one host sync), the
# per-step coefficients are formed in double precision, and the tensors stay float32. Each
# mean is one fused ``a * x + b * v``, so the sampler's own cost is a few passes per step.
SDEMean = Callable[[Tensor, Tensor, float, float, float, float], Tensor]


def check_grid(sigmas: Tensor, noise_level: Tensor | None = None) -> None:
    """Raise ValueError unless ``sigmas (T+1,)`` decreases strictly from <= 1 to exactly 0."""
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(
            f"sigmas must be a 1-D tensor of T+1 >= 2 values, got shape {tuple(sigmas.shape)}; "
            "build it with densegrpo.method.sigmas.make_sigmas(T)."
        )
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or float(sigmas[0]) > 1.0 or float(sigmas[-1]) != 0.0:
        raise ValueError(
            "sigmas must decrease strictly from at most 1 to exactly 0; "
            "build them with densegrpo.method.sigmas.make_sigmas(T)."
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


def sigma_cap(sigmas: Tensor | list[float]) -> float:
    """The largest grid sigma strictly below 1, used in place of 1 - sigma = 0."""
    values = sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas
    return max(s for s in values if s < 1.0)


def euler_mean(x: Tensor, v: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """ODE (Euler) step: ``x + v * dt`` with ``dt = sigma_next - sigma < 0``."""
    return torch.add(x, v, alpha=float(sigma_next) - float(sigma))


def flow_sde_std(sigma: float, noise_level: float, cap: float) -> float:
    """Flow-GRPO's ``std_t = a * sqrt(sigma / (1 - sigma))``; at ``sigma == 1`` the
    denominator uses ``1 - cap`` (the largest grid sigma below 1), as Flow-GRPO does."""
    denominator_sigma = cap if sigma >= 1.0 else sigma
    return noise_level * math.sqrt(sigma / (1.0 - denominator_sigma))


def flow_sde_mean(x: Tensor, v: Tensor, sigma: float, sigma_next: float, noise_level: float,
                  cap: float) -> Tensor:
    """Flow-GRPO mean ``x + [v + std_t^2 / (2 sigma) * (x + (1 - sigma) v)] * dt``, expanded
    to ``(1 + d dt) x + (1 + d (1 - sigma)) dt v`` with ``d = std_t^2 / (2 sigma)``."""
    dt = sigma_next - sigma
    drift = flow_sde_std(sigma, noise_level, cap) ** 2 / (2.0 * sigma)
    return torch.add(x * (1.0 + drift * dt), v, alpha=(1.0 + drift * (1.0 - sigma)) * dt)


def dance_sde_mean(x: Tensor, v: Tensor, sigma: float, sigma_next: float, noise_level: float,
                   cap: float) -> Tensor:
    """DanceGRPO's SDE mean with a constant noise coefficient ``eta = noise_level``:
    ``x + [v + eta^2 / (2 sigma) * (x + (1 - sigma) v)] * dt``, the Flow-SDE mean with ``std_t = eta``
    (expanded like :func:`flow_sde_mean`); ``cap`` is unused, since ``std_t`` never divides by ``1 - sigma``.

    DanceGRPO writes it with the score of the rectified-flow marginal,
    ``score = -(x - (1 - sigma) x0_hat) / sigma^2``, ``x0_hat = x - sigma v``:
    ``mean = x + v dt - eta^2 / 2 * score * dt`` (XueZeyue/DanceGRPO fastvideo/train_grpo_flux.py,
    ``flux_step``, lines 141-153), and ``x - (1 - sigma) x0_hat = sigma (x + (1 - sigma) v)``.
    """
    del cap
    dt = sigma_next - sigma
    drift = noise_level**2 / (2.0 * sigma)
    return torch.add(x * (1.0 + drift * dt), v, alpha=(1.0 + drift * (1.0 - sigma)) * dt)


def cps_std(sigma_next: float, noise_level: float) -> float:
    """Coefficient-preserving sampling: ``std_t = sigma_next * sin(a * pi / 2)``."""
    return sigma_next * math.sin(noise_level * (math.pi / 2.0))


def cps_mean(x: Tensor, v: Tensor, sigma: float, sigma_next: float, noise_level: float,
             cap: float) -> Tensor:
    """CPS mean ``(x - sigma v)(1 - sigma_next) + (x + (1 - sigma) v) c``,
    ``c = sqrt(sigma_next^2 - std_t^2)``, expanded to ``(1 - sigma_next + c) x +
    (-sigma (1 - sigma_next) + (1 - sigma) c) v``.

    ``x - sigma v`` is the clean estimate and ``x + (1 - sigma) v`` the noise estimate of
    the rectified-flow interpolation; ``cap`` is unused.
    """
    del cap
    std_t = cps_std(sigma_next, noise_level)
    c = math.sqrt(max(sigma_next**2 - std_t**2, 0.0))
    return torch.add(x * (1.0 - sigma_next + c), v, alpha=-sigma * (1.0 - sigma_next) + (1.0 - sigma) * c)


def block_spread(eps: Tensor, block: int) -> Tensor:
    """``P eps``: the orthogonal projection of ``eps (..., h, w)`` onto images that are constant
    over ``block x block`` pixel squares (each square gets its mean); ``block = 1`` is the identity.

    The subspace has ``d = C (h / block) (w / block)`` dimensions and the orthonormal basis
    ``U`` of square indicators divided by ``block``, so ``P = U U^T``. For ``eps ~ N(0, I)``,
    ``P eps ~ N(0, P)``: unit variance along each of the ``d`` directions, none elsewhere.
    """
    if block == 1:
        return eps
    return block_coordinates(eps, block).repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1) / block


def block_coordinates(residual: Tensor, block: int) -> Tensor:
    """``U^T r``: the ``d`` coordinates ``(..., h / block, w / block)`` of ``residual (..., h, w)``
    in the block-constant subspace (each square's sum divided by ``block``)."""
    if block == 1:
        return residual
    *lead, h, w = residual.shape
    if h % block or w % block:
        raise ValueError(f"noise block {block} must divide the latent's height and width, got {h} x {w}.")
    squares = residual.reshape(*lead, h // block, block, w // block, block)
    return squares.sum(dim=(-3, -1)) / block


def block_log_prob(x_next: Tensor, mean: Tensor, std: float, block: int) -> Tensor:
    """``log N(U^T x_next; U^T mean, std^2 I_d)`` averaged over the ``d`` subspace dims -> ``(N,)``:
    the density of a step whose noise is ``std * P eps`` (see :func:`block_spread`), in the
    coordinates where it is non-degenerate. ``block = 1`` is :func:`gaussian_log_prob`."""
    if block == 1:
        return gaussian_log_prob(x_next, mean, std)
    coordinates = block_coordinates(x_next.to(torch.float32) - mean, block)
    square = coordinates.square().flatten(1).mean(dim=1)
    return square * (-0.5 / std**2) - (math.log(std) + LOG_SQRT_2PI)


def block_expected_log_ratio(mean: Tensor, old_mean: Tensor, step_std: float, block: int) -> Tensor:
    """``E[log p_theta - log p_old]`` over the old step's draws when the noise is ``step_std * P eps``
    (:func:`block_log_prob`'s density) -> ``(N,)``: ``-mean_d((U^T (mean - old_mean))^2) / (2 s^2)``
    over the ``d`` subspace coordinates. The part of the mean's move outside ``range(P)`` does not
    enter the log-prob, so it does not enter this either; ``block = 1`` is the isotropic form
    (:func:`densegrpo.contracts.protocols.gaussian_expected_log_ratio`). RatioNorm subtracts it."""
    coordinates = block_coordinates(mean.float() - old_mean.float(), block)
    return coordinates.square().flatten(1).mean(dim=1) * (-0.5 / step_std**2)


def block_flow_sde_mean(x: Tensor, v: Tensor, sigma: float, sigma_next: float, noise_level: float,
                        cap: float, block: int = 1) -> Tensor:
    """Flow-SDE mean for noise confined to the block-constant subspace:
    ``x + v dt + d dt P (x + (1 - sigma) v)`` with ``d = std_t^2 / (2 sigma)``.

    The Fokker-Planck equation of ``dx = f dt + g P dW`` keeps the flow's marginals when
    ``f = v - (g^2 / 2) P grad log p_t``: the score correction acts only where the noise does.
    With ``grad log p_t = -(x + (1 - sigma) v) / sigma`` this is Flow-GRPO's correction
    projected by ``P``; ``block = 1`` is :func:`flow_sde_mean`.
    """
    if block == 1:
        return flow_sde_mean(x, v, sigma, sigma_next, noise_level, cap)
    dt = sigma_next - sigma
    drift = flow_sde_std(sigma, noise_level, cap) ** 2 / (2.0 * sigma)
    correction = block_spread(torch.add(x, v, alpha=1.0 - sigma), block)
    return torch.add(torch.add(x, v, alpha=dt), correction, alpha=drift * dt)


def gaussian_log_prob(x_next: Tensor, mean: Tensor, std: float) -> Tensor:
    """``log N(x_next; mean, std^2 I)`` averaged over every non-batch dim -> ``(N,)`` float32:
    ``-mean((x_next - mean)^2) / (2 std^2) - log(std) - log(sqrt(2 pi))``."""
    square = (x_next.to(torch.float32) - mean).square().flatten(1).mean(dim=1)
    return square * (-0.5 / std**2) - (math.log(std) + LOG_SQRT_2PI)


def velocity_f32(policy: Policy, x: Tensor, sigma: float, cond: Cond) -> Tensor:
    """``policy.velocity`` at one grid sigma for the whole batch, cast to float32."""
    sigma_batch = torch.full((x.shape[0],), sigma, dtype=torch.float32, device=x.device)
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
    noise_block: int = 1,
    std_t: Tensor | None = None,
) -> Trajectory:
    """Run ``T`` Gaussian transitions from ``noise (N,C,h,w)`` and record everything in a
    :class:`Trajectory` (``trained_steps[:, k] = step_std[k] > 0``).

    Args:
        step_std: ``(T,)`` float32, the transition std of every step (``0`` = Euler step);
            its float32 values are the stds used.
        sde_mean: the stochastic steps' mean function (see :data:`SDEMean`).
        noise_block: the step noise is ``step_std * P eps`` with ``P`` the projection onto
            ``noise_block``-square-constant images (:func:`block_spread`; 1: isotropic noise),
            and the log-prob is :func:`block_log_prob`.
        std_t: ``(T,)`` :attr:`Trajectory.std_t`; ``None``: ``step_std / sqrt(-dt)`` (flow-SDE).
    """
    device = torch.device(policy.device) if not isinstance(policy.device, torch.device) else policy.device
    if noise.ndim not in (4, 5):
        raise ValueError(f"noise must be (N, C, h, w), or (N, C, F, h, w) for video, got shape {tuple(noise.shape)}.")
    if len(cond) != noise.shape[0]:
        raise ValueError(f"cond has {len(cond)} rows but noise has {noise.shape[0]}; encode one prompt per sample.")
    sigmas = sigmas.to(device=device, dtype=torch.float32)
    noise_level = noise_level.to(device=device, dtype=torch.float32)
    step_std = step_std.to(device=device, dtype=torch.float32)
    num_samples, num_steps = noise.shape[0], sigmas.numel() - 1
    stochastic = step_std > 0
    # One host read of the schedule; the step coefficients are Python floats (see SDEMean).
    grid, levels, stds = sigmas.tolist(), noise_level.tolist(), step_std.tolist()
    cap = sigma_cap(grid)

    with torch.no_grad():
        x = noise.to(device=device, dtype=torch.float32)
        draws = None
        if any(std > 0 for std in stds):
            draws = draw_step_noise(
                (num_samples, num_steps, *x.shape[1:]), device, step_noise, generator
            )
        latents = [x]
        means, velocities, log_probs = [], [], []
        for k in range(num_steps):
            sigma, sigma_next = grid[k], grid[k + 1]
            v = velocity_f32(policy, x, sigma, cond)
            if stds[k] > 0:
                mean = sde_mean(x, v, sigma, sigma_next, levels[k], cap)
                x_next = torch.add(mean, block_spread(draws[:, k], noise_block), alpha=stds[k])
                log_prob = block_log_prob(x_next, mean, stds[k], noise_block)
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
        std_t=None if std_t is None else std_t.to(device=device, dtype=torch.float32),
    )


def gaussian_step_log_prob(
    policy: Policy, traj: Trajectory, step: int, sde_mean: SDEMean, noise_block: int = 1
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
    grid = traj.sigmas.to(torch.float32).tolist()
    sigma, sigma_next = grid[k], grid[k + 1]
    x = traj.latents[:, k].to(torch.float32)
    v = velocity_f32(policy, x, sigma, traj.cond)
    std = float(traj.step_std[k])
    if std > 0:
        level = float(traj.noise_level[k])
        mean = sde_mean(x, v, sigma, sigma_next, level, sigma_cap(grid))
        return block_log_prob(traj.latents[:, k + 1], mean, std, noise_block), mean
    mean = euler_mean(x, v, sigma, sigma_next)
    return 0.0 * mean.flatten(1).sum(dim=1), mean


__all__ = [
    "block_coordinates",
    "block_expected_log_ratio",
    "block_flow_sde_mean",
    "block_log_prob",
    "block_spread",
    "check_grid",
    "cps_mean",
    "cps_std",
    "dance_sde_mean",
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
