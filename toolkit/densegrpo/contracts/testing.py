"""An analytic policy and small helpers for tests and plugin authors.

:class:`GaussianFlowPolicy` is the exact rectified-flow velocity of Gaussian data, so
samplers, the dense-reward engine and the GRPO loop can be checked against closed forms
in milliseconds, with no network and no weights.

Derivation (per latent dimension, all dimensions independent). Data ``x0 ~ N(mu, s^2)``,
noise ``eps ~ N(0, 1)``, interpolation ``x = (1 - sigma) x0 + sigma eps``, target velocity
``u = eps - x0``. ``(x, u)`` is jointly Gaussian with

    E[x] = (1 - sigma) mu                 Var[x]   = (1 - sigma)^2 s^2 + sigma^2
    E[u] = -mu                            Cov[u,x] = sigma - (1 - sigma) s^2

so the optimal (flow-matching) velocity is the linear regression of ``u`` on ``x``::

    v(x, sigma) = E[u | x] = -mu + (sigma - (1 - sigma) s^2) / Var[x] * (x - (1 - sigma) mu).

Checks: ``sigma = 1`` gives ``x - mu`` (= eps - E[x0]); ``sigma = 0`` gives ``-x``. The
marginal of ``x_sigma`` is ``N((1 - sigma) mu, Var[x])`` (:meth:`GaussianFlowPolicy.marginal`).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from densegrpo.contracts.protocols import Cond


class GaussianFlowPolicy(nn.Module):
    """Exact velocity of ``x0 ~ N(mu + shift(prompt), s^2 I)``, a trainable analytic Policy.

    Args:
        mean: initial ``mu`` (a float, or a tensor broadcastable to ``latent_shape``).
        std: initial ``s`` (> 0); stored as the scalar parameter ``log_std``.
        latent_shape: ``(C, h, w)``, or ``(C, F, h, w)`` for a video-shaped policy (``F`` frames).
        prompt_shifts: optional ``{prompt: shift}``; :meth:`encode` puts the shift in
            ``prompt_embeds (N, 1, 1)`` and the data mean becomes ``mu + shift`` for that
            prompt, so rewards can depend on the prompt. Unknown prompts shift by 0.
        dtype: dtype of the returned velocity (e.g. ``torch.bfloat16`` to mimic a
            half-precision model); the maths itself is float32.
        train_std: whether ``log_std`` is trainable (``mu`` always is).
        device: where the parameters live.

    ``decode`` maps a latent to an image ``sigmoid(x)`` of its first three channels (one
    channel is repeated when ``C < 3``), so images are in (0, 1), smooth and monotone in the
    latent; a ``(C, F, h, w)`` latent decodes to a video ``(N, F, 3, h, w)``, frame by frame.
    """

    def __init__(
        self,
        mean: float | Tensor = 0.7,
        std: float = 0.4,
        latent_shape: Sequence[int] = (3, 8, 8),
        prompt_shifts: dict[str, float] | None = None,
        dtype: torch.dtype = torch.float32,
        train_std: bool = True,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        if len(latent_shape) not in (3, 4):
            raise ValueError(f"latent_shape must be (C, h, w) or (C, F, h, w), got {tuple(latent_shape)}.")
        if not std > 0:
            raise ValueError(f"std must be positive, got {std}.")
        self.latent_shape: tuple[int, ...] = tuple(int(d) for d in latent_shape)  # type: ignore[assignment]
        self.dtype = dtype
        self.prompt_shifts = dict(prompt_shifts or {})
        mu = torch.as_tensor(mean, dtype=torch.float32).expand(self.latent_shape).clone()
        self.mu = nn.Parameter(mu.to(device))
        self.log_std = nn.Parameter(
            torch.tensor(math.log(std), dtype=torch.float32, device=device), requires_grad=train_std
        )
        self._base = {name: p.detach().clone() for name, p in self.named_parameters()}

    @property
    def device(self) -> torch.device:
        return self.mu.device

    # -- Policy protocol ---------------------------------------------------------------
    def encode(self, prompts: list[str]) -> Cond:
        """``prompt_embeds (N, 1, 1)`` holds each prompt's mean shift."""
        shifts = [float(self.prompt_shifts.get(p, 0.0)) for p in prompts]
        embeds = torch.tensor(shifts, dtype=torch.float32, device=self.device).view(-1, 1, 1)
        return Cond(prompt_embeds=embeds, prompts=list(prompts))

    def data_mean(self, cond: Cond) -> Tensor:
        """``(N, *latent_shape)`` mean of the data for each row of ``cond``."""
        shift = cond.prompt_embeds[:, 0, 0].to(torch.float32).view(-1, *[1] * len(self.latent_shape))
        return self.mu.unsqueeze(0) + shift

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        """Exact ``E[eps - x0 | x_sigma = x]`` for ``x (N,C,h,w)``, ``sigma (N,)``."""
        x = x.to(torch.float32)
        s = sigma.to(device=x.device, dtype=torch.float32).view(-1, *[1] * len(self.latent_shape))
        mu = self.data_mean(cond)
        var0 = torch.exp(2.0 * self.log_std)
        var_x = (1.0 - s) ** 2 * var0 + s**2
        gain = (s - (1.0 - s) * var0) / var_x
        v = -mu + gain * (x - (1.0 - s) * mu)
        return v.to(self.dtype)

    def decode(self, x0: Tensor) -> Tensor:
        """``x0 (N,C,h,w)`` -> images ``sigmoid(x0[:, :3])`` float32 ``(N, 3, h, w)``; ``x0 (N,C,F,h,w)`` ->
        videos ``(N, F, 3, h, w)``."""
        x0 = x0.to(torch.float32)
        if x0.ndim == 5:
            frames = x0.permute(0, 2, 1, 3, 4)  # (N, F, C, h, w)
            return self.decode(frames.flatten(0, 1)).unflatten(0, frames.shape[:2])
        rgb = x0[:, :3] if x0.shape[1] >= 3 else x0[:, :1].expand(-1, 3, -1, -1)
        return torch.sigmoid(rgb)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    @contextmanager
    def reference(self) -> Iterator["GaussianFlowPolicy"]:
        """Temporarily restore the initial (base) parameter values."""
        current = {name: p.detach().clone() for name, p in self.named_parameters()}
        with torch.no_grad():
            for name, p in self.named_parameters():
                p.copy_(self._base[name])
        try:
            yield self
        finally:
            with torch.no_grad():
                for name, p in self.named_parameters():
                    p.copy_(current[name])

    def trainable_state_dict(self) -> dict[str, Tensor]:
        return {name: p.detach().clone() for name, p in self.named_parameters() if p.requires_grad}

    def load_trainable_state_dict(self, state: dict[str, Tensor]) -> None:
        params = dict(self.named_parameters())
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise ValueError(f"unknown parameter names {unknown}; expected some of {sorted(params)}.")
        with torch.no_grad():
            for name, value in state.items():
                params[name].copy_(value)

    # -- closed forms for tests ---------------------------------------------------------
    @property
    def std(self) -> float:
        return float(torch.exp(self.log_std))

    def marginal(self, sigma: float | Tensor, shift: float = 0.0) -> tuple[Tensor, Tensor]:
        """Exact ``(mean (C,h,w), std (scalar))`` of ``x_sigma`` for a prompt shift."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32)
        with torch.no_grad():
            mean = (1.0 - sigma) * (self.mu + shift)
            std = torch.sqrt((1.0 - sigma) ** 2 * torch.exp(2.0 * self.log_std) + sigma**2)
        return mean, std

    def sample_data(self, num: int, generator: torch.Generator | None = None) -> Tensor:
        """``num`` exact draws of ``x0`` (no prompt shift), ``(num, C, h, w)`` float32."""
        eps = torch.randn((num, *self.latent_shape), generator=generator, dtype=torch.float32)
        with torch.no_grad():
            return self.mu.detach().cpu() + self.std * eps


class CountingPolicy:
    """Wraps a Policy and counts velocity evaluations: ``calls`` and ``rows`` (the NFE),
    plus ``batch_sizes``, the size of every call. Every other attribute is forwarded."""

    def __init__(self, policy) -> None:
        self.policy = policy
        self.reset()

    def reset(self) -> None:
        self.calls = 0
        self.rows = 0
        self.batch_sizes: list[int] = []

    def velocity(self, x: Tensor, sigma: Tensor, cond: Cond) -> Tensor:
        self.calls += 1
        self.rows += int(x.shape[0])
        self.batch_sizes.append(int(x.shape[0]))
        return self.policy.velocity(x, sigma, cond)

    def __getattr__(self, name: str):
        return getattr(self.__dict__["policy"], name)


def mean_brightness_reward(images: Tensor) -> Tensor:
    """Deterministic toy reward: ``images (N,3,H,W)`` -> mean pixel value ``(N,)`` float32."""
    return images.to(torch.float32).flatten(1).mean(dim=1)


__all__ = ["CountingPolicy", "GaussianFlowPolicy", "mean_brightness_reward"]
