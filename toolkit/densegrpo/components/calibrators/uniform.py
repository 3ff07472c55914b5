"""Flow-GRPO's exploration schedule: the same SDE noise level a at every step."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import CalibrationStats


def num_steps_of(sigmas: Tensor, who: str) -> int:
    """``T`` from a ``(T+1,)`` sigma grid; ``ValueError`` for anything else."""
    if not isinstance(sigmas, Tensor) or sigmas.dim() != 1 or sigmas.shape[0] < 2:
        shape = tuple(sigmas.shape) if isinstance(sigmas, Tensor) else type(sigmas).__name__
        raise ValueError(f"{who}: sigmas must be a 1-D (T+1,) tensor with at least 2 entries, got {shape}")
    return int(sigmas.shape[0]) - 1


class UniformCalibrator:
    """A constant noise level ``a`` for every step (Flow-GRPO, method.md section 1).

    ``noise_level(sigmas (T+1,)) -> (T,)`` float32 filled with ``a``; :meth:`update` is a
    no-op. It defines the protocol's optional members (``calibration_rounds`` 0, ``converged``,
    ``uniform_level``, ``state_dict``, ``limit_noise_level``) like the reward-aware calibrator.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        noise_level: float = Field(
            0.7, ge=0.0, description="a, the SDE noise level of every step (Flow-GRPO's default 0.7)."
        )

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self.history: list[dict[str, Any]] = []

    def noise_level(self, sigmas: Tensor) -> Tensor:
        """``sigmas (T+1,)`` -> ``(T,)`` float32, every entry ``a``."""
        num_steps = num_steps_of(sigmas, "uniform calibrator")
        return torch.full((num_steps,), self.config.noise_level, dtype=torch.float32, device=sigmas.device)

    def update(self, stats: CalibrationStats) -> None:
        """A fixed schedule learns nothing."""

    def limit_noise_level(self, low: float, high: float) -> None:
        """A fixed level outside the sampler's ``noise_level_range`` is a config error, said before any rollout."""
        if not low <= self.config.noise_level <= high:
            raise UserError(
                f"uniform calibrator: noise_level {self.config.noise_level} lies outside the sampler's range "
                f"[{low}, {high}]; set calibrator.config.noise_level inside it"
            )

    calibration_rounds = 0
    """A fixed schedule runs no rounds before training."""
    samples_per_round = None

    @property
    def uniform_level(self) -> float:
        """``a`` itself."""
        return float(self.config.noise_level)

    @property
    def converged(self) -> bool:
        """Always ``True``: the schedule never changes."""
        return True

    @property
    def done(self) -> bool:
        """Always ``True``: no calibration rounds are needed."""
        return True

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state (there is none beyond the config)."""
        return {"noise_level": float(self.config.noise_level), "history": []}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; a different ``noise_level`` means a different config."""
        saved = state.get("noise_level") if isinstance(state, dict) else None
        if saved is None:
            raise ValueError("uniform calibrator state must be a dict with a 'noise_level'; pass what state_dict() returned")
        if float(saved) != float(self.config.noise_level):
            raise ValueError(
                f"the checkpoint used noise_level {saved} but this run's uniform calibrator has "
                f"{self.config.noise_level}; resume with the run's original config"
            )
