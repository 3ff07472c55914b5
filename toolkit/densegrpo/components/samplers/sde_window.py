"""SDE on a window of steps, ODE elsewhere (MixGRPO / Flow-GRPO-Fast; method.md section 1)."""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo.components.samplers._gaussian import (
    check_grid,
    cps_mean,
    flow_sde_mean,
    gaussian_rollout,
    gaussian_step_log_prob,
)
from densegrpo.components.samplers.cps import CPSSampler, cps_step_std
from densegrpo.components.samplers.flow_sde import flow_sde_std_t, flow_sde_step_std
from densegrpo.contracts.protocols import Cond, Policy, Trajectory

_MEANS = {"flow-sde": flow_sde_mean, "cps": cps_mean}


class SDEWindowSampler:
    """Stochastic steps only inside a window ``[start, start + window_size)``; Euler ODE
    steps elsewhere; only window steps carry a log-prob and are trained.

    Choosing the window. With ``window_start`` set, the window is fixed. Otherwise each call
    of :meth:`rollout` draws ``start`` uniformly from ``[0, min(max_window_start,
    T - window_size)]``. When the caller passes a ``generator`` (the GRPO loop passes one seeded
    by ``(seed, iteration)``), the draw is seeded by ``generator.initial_seed()`` (without
    consuming it), so a resumed run and every rank of a multi-process run pick the same window.
    Without one, a counter-based generator seeded by ``(seed, calls)`` is used, where ``calls``
    counts this sampler's rollouts. One rollout call samples the whole batch, so the window is
    shared by every prompt group of that iteration. :meth:`window` tells which window a call
    will use.

    Inside the window the step is ``sde`` (``flow-sde`` or ``cps``) with the given noise
    level; outside, ``noise_level`` is recorded as 0.
    """

    class Config(BaseModel):
        """Options of the SDE-window sampler."""

        model_config = ConfigDict(extra="forbid")
        window_size: int = Field(
            2, ge=1, description="Number of consecutive SDE (trained) steps; MixGRPO and "
            "Flow-GRPO-Fast train 1 to 4 steps per iteration."
        )
        window_start: int | None = Field(
            None, ge=0, description="Fix the window's first step index k (0 = the pure-noise step); "
            "None draws it per rollout call."
        )
        max_window_start: int | None = Field(
            None, ge=0, description="Latest step index a drawn window may start at (None: T - window_size). "
            "Flow-GRPO-Fast keeps the window among the early, high-noise steps."
        )
        seed: int = Field(0, description="Seed of the per-call window draw.")
        sde: Literal["flow-sde", "cps"] = Field(
            "flow-sde", description="Stochastic step used inside the window."
        )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config if config is not None else self.Config()
        self.calls = 0

    @property
    def noise_level_range(self) -> tuple[float, float]:
        """The levels the window's ``sde`` accepts: ``(0, 1)`` for cps, ``(0, inf)`` for flow-sde."""
        return CPSSampler.noise_level_range if self.config.sde == "cps" else (0.0, math.inf)

    def window(self, num_steps: int, call: int | None = None, generator: torch.Generator | None = None) -> tuple[int, int]:
        """``(start, stop)`` step indices of the window of rollout number ``call``
        (default: the next one), or of the rollout seeded by ``generator``, on a ``T = num_steps`` grid."""
        size = self.config.window_size
        if size > num_steps:
            raise ValueError(
                f"window_size {size} exceeds the {num_steps} sampling steps; lower window_size."
            )
        last = num_steps - size
        if self.config.window_start is not None:
            if self.config.window_start > last:
                raise ValueError(
                    f"window_start {self.config.window_start} + window_size {size} exceeds the "
                    f"{num_steps} steps; use window_start <= {last}."
                )
            start = self.config.window_start
        else:
            if self.config.max_window_start is not None:
                last = min(last, self.config.max_window_start)
            if generator is not None and call is None:
                start = random.Random(self.config.seed * 1_000_003 + generator.initial_seed()).randint(0, last)
            else:
                call = self.calls if call is None else call
                start = random.Random(self.config.seed * 1_000_003 + call).randint(0, last)
        return start, start + size

    def rollout(
        self,
        policy: Policy,
        cond: Cond,
        noise: Tensor,
        sigmas: Tensor,
        noise_level: Tensor,
        *,
        step_noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> Trajectory:
        """Sample from ``noise (N,C,h,w)`` along ``sigmas (T+1,)``; ``noise_level (T,)`` is
        used inside this call's window only."""
        check_grid(sigmas, noise_level)
        start, stop = self.window(sigmas.numel() - 1, generator=generator)
        self.calls += 1
        level = torch.zeros(noise_level.shape, dtype=torch.float32)
        level[start:stop] = noise_level[start:stop].to("cpu", torch.float32)
        if self.config.sde == "cps":
            step_std = std_t = cps_step_std(sigmas, level)
        else:
            step_std, std_t = flow_sde_step_std(sigmas, level), flow_sde_std_t(sigmas, level)
        return gaussian_rollout(
            policy, cond, noise, sigmas, level, step_std, _MEANS[self.config.sde],
            step_noise=step_noise, generator=generator, std_t=std_t,
        )

    def log_prob(self, policy: Policy, traj: Trajectory, step: int) -> tuple[Tensor, Tensor]:
        """Step ``k``'s ``(log_prob (N,), mean (N,C,h,w))`` recomputed with gradients."""
        return gaussian_step_log_prob(policy, traj, step, _MEANS[self.config.sde])
