"""DenseGRPO's reward-aware exploration calibration (Algorithm 1, method.md section 4).

One round, from the dense gains ``dR`` of ``N`` SDE trajectories sampled with the current
``psi``: for every step,
    n_pos = #(dR > 0),  n_neg = #(dR < 0)
    |n_pos - n_neg| < eps1  ->  psi += eps2     (balanced: explore more)
    otherwise               ->  psi -= eps2     (imbalanced: too much noise, most samples get worse)

The paper gives no clamp range, no round count and no convergence test; this toolkit adds:

* a clamp range for psi (default ``[0, 1.5]``), narrowed to the sampler's
  ``noise_level_range`` by :meth:`RewardAwareCalibrator.limit_noise_level` (cps: ``[0, 1]``);
* ``max_rounds`` (default 10) after which :attr:`done` is true;
* a convergence test. Under Algorithm 1 psi never stands still (every round moves every
  step by +-eps2) unless it is pinned at a clamp bound, so "psi no longer changes" cannot
  mean equality: at its balance point a step oscillates, up one round and down the next.
  :attr:`converged` is true once ``window`` rounds (default 4) have been applied and, for
  every step, psi took at most two values one ``eps2`` apart over those rounds
  (``max - min <= eps2`` over the ``window + 1`` values, within ``1e-3 * eps2``): a pure
  +-eps2 oscillation, or pinned at a clamp bound. A step that still travels, or creeps
  (up, up, down, ...), spans at least ``2 * eps2`` and blocks convergence. With noisy
  counts a settled step sometimes misses a turn; convergence then waits for a clean
  window, and ``max_rounds`` ends calibration if none comes.

Steps whose gains are all NaN carry no information and keep their psi for the round.

Note on eps1. With the paper's eps1 = 2 and an even N, ``n_pos - n_neg`` is even (when no
gain is exactly 0), so "balanced" means an exact tie. For gains that are fair coins the
tie has probability C(N, N/2) / 2^N (0.14 for N = 32), so psi goes down in most rounds
even where the gains are balanced on average. If psi keeps falling, raise eps1 (about
sqrt(N)) or lower ``samples_per_round``; tests/test_calibrators.py shows both behaviours.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

from densegrpo.components.calibrators.uniform import num_steps_of
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import CalibrationStats


class RewardAwareCalibrator:
    """Per-step SDE noise level ``psi (T,)`` tuned by DenseGRPO's Algorithm 1.

    * :meth:`noise_level` ``(sigmas (T+1,)) -> psi (T,)`` float32; psi starts at ``initial``
      for every step, sized lazily from the first grid it sees.
    * :meth:`update` applies one round from ``CalibrationStats.gains (N, T)``.
    * ``history``: one JSON-serialisable dict per round, with ``round`` (1-based),
      ``psi_before``, ``psi``, ``n_pos``, ``n_neg``, ``n_valid`` and ``balanced`` per step.
    * :attr:`converged`, :attr:`done`, :meth:`state_dict` / :meth:`load_state_dict`.
    * :meth:`limit_noise_level` narrows the clamp to the sampler's range; :attr:`bounds` is the result.

    The loop samples ``samples_per_round`` trajectories (fresh prompts) per round and
    calls :meth:`update` until :attr:`done`; online re-calibration calls it again later
    regardless of :attr:`done`.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")

        initial: float = Field(
            0.7, ge=0.0, description="Starting psi of every step: the uniform noise level a (Flow-GRPO's 0.7)."
        )
        eps1: float = Field(
            2.0, gt=0.0, description="Balance threshold: a step is balanced when |n_pos - n_neg| < eps1 (DenseGRPO Alg. 1: 2)."
        )
        eps2: float = Field(0.01, gt=0.0, description="Change of psi per round (DenseGRPO Alg. 1: 0.01).")
        samples_per_round: int = Field(
            32, ge=1, description="N, trajectories (each with a fresh prompt) sampled per round (Alg. 1's N; the loop reads it)."
        )
        max_rounds: int = Field(
            10, ge=0, description="Rounds after which calibration stops even without convergence (the paper gives none)."
        )
        clamp: tuple[float, float] = Field(
            (0.0, 1.5), description="Range psi is kept in, (min, max) (the paper gives none)."
        )
        window: int = Field(
            4,
            ge=2,
            description="Converged when, over the last `window` rounds, every step's psi took at most two values "
            "eps2 apart (an up/down oscillation, or pinned at a clamp bound); the paper has no convergence test.",
        )

        @model_validator(mode="after")
        def _check_range(self) -> "RewardAwareCalibrator.Config":
            low, high = self.clamp
            if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or low > high:
                raise ValueError(f"clamp must be (min, max) with 0 <= min <= max, got {self.clamp}; e.g. [0.0, 1.5]")
            if not low <= self.initial <= high:
                raise ValueError(
                    f"initial psi {self.initial} lies outside clamp {self.clamp}; choose an initial value inside the range"
                )
            return self

    def __init__(self, config: Config | None = None) -> None:
        self.config = config or self.Config()
        self._psi: list[float] | None = None
        self.history: list[dict[str, Any]] = []
        self._limit = (0.0, math.inf)

    # -- the protocol -----------------------------------------------------------------
    def noise_level(self, sigmas: Tensor) -> Tensor:
        """``sigmas (T+1,)`` -> psi ``(T,)`` float32 on ``sigmas.device``."""
        psi = self._psi_for(num_steps_of(sigmas, "reward-aware calibrator"))
        return torch.tensor(psi, dtype=torch.float32, device=sigmas.device)

    def update(self, stats: CalibrationStats) -> None:
        """One round of Algorithm 1 from ``stats.gains (N, T)``; NaN gains are ignored."""
        gains = stats.gains
        if not isinstance(gains, Tensor) or gains.dim() != 2 or gains.shape[0] == 0:
            shape = tuple(gains.shape) if isinstance(gains, Tensor) else type(gains).__name__
            raise ValueError(f"reward-aware calibrator: gains must be a non-empty (N, T) tensor, got {shape}")
        psi_before = self._psi_for(int(gains.shape[1]))
        gains = gains.detach()
        n_pos = (gains > 0).sum(dim=0).tolist()  # NaN compares False: not counted
        n_neg = (gains < 0).sum(dim=0).tolist()
        n_valid = torch.isfinite(gains).sum(dim=0).tolist()
        low, high = self.bounds
        psi, balanced = [], []
        for value, pos, neg, valid in zip(psi_before, n_pos, n_neg, n_valid):
            is_balanced = abs(pos - neg) < self.config.eps1
            balanced.append(bool(is_balanced))
            if valid == 0:
                psi.append(value)  # no information about this step
                continue
            step = self.config.eps2 if is_balanced else -self.config.eps2  # Alg. 1
            psi.append(min(max(value + step, low), high))
        self._psi = psi
        self.history.append(
            {
                "round": len(self.history) + 1,
                "psi_before": list(psi_before),
                "psi": list(psi),
                "n_pos": [int(n) for n in n_pos],
                "n_neg": [int(n) for n in n_neg],
                "n_valid": [int(n) for n in n_valid],
                "balanced": balanced,
            }
        )

    # -- the protocol's optional members ----------------------------------------------
    @property
    def calibration_rounds(self) -> int:
        """Rounds before training: ``max_rounds`` (fewer once :attr:`converged`)."""
        return int(self.config.max_rounds)

    @property
    def samples_per_round(self) -> int:
        """``N`` of Algorithm 1."""
        return int(self.config.samples_per_round)

    @property
    def uniform_level(self) -> float:
        """The starting psi, Flow-GRPO's uniform level by default."""
        return float(self.config.initial)

    def limit_noise_level(self, low: float, high: float) -> None:
        """Keep psi inside the sampler's ``noise_level_range`` ``[low, high]`` too: the clamp becomes
        the intersection of both, and a psi already held is clamped to it."""
        clamp_low, clamp_high = self.config.clamp
        if max(low, clamp_low) > min(high, clamp_high):
            raise UserError(
                f"reward-aware calibrator: clamp {list(self.config.clamp)} and the sampler's noise-level range "
                f"[{low}, {high}] do not overlap; set calibrator.config.clamp inside [{low}, {high}]"
            )
        self._limit = (float(low), float(high))
        low, high = self.bounds
        if not low <= self.config.initial <= high:
            raise UserError(
                f"reward-aware calibrator: initial psi {self.config.initial} lies outside the sampler's noise-level range "
                f"[{self._limit[0]}, {self._limit[1]}]; set calibrator.config.initial inside it"
            )
        if self._psi is not None:
            self._psi = [min(max(value, low), high) for value in self._psi]

    @property
    def bounds(self) -> tuple[float, float]:
        """``(low, high)`` psi is clamped to: ``config.clamp`` within the sampler's range."""
        return max(self.config.clamp[0], self._limit[0]), min(self.config.clamp[1], self._limit[1])

    # -- bookkeeping ------------------------------------------------------------------
    @property
    def psi(self) -> list[float] | None:
        """The current psi per step (``None`` before the first grid), as plain floats."""
        return None if self._psi is None else list(self._psi)

    @property
    def rounds(self) -> int:
        """Rounds applied so far."""
        return len(self.history)

    @property
    def converged(self) -> bool:
        """Every step's psi stayed within one ``eps2`` over the last ``window`` rounds (module docstring)."""
        window = self.config.window
        if len(self.history) < window:
            return False
        recent = self.history[-window:]
        trail = [recent[0]["psi_before"]] + [entry["psi"] for entry in recent]
        limit = self.config.eps2 * (1 + 1e-3)
        return all(max(values) - min(values) <= limit for values in zip(*trail))

    @property
    def done(self) -> bool:
        """Calibration before training may stop: converged, or ``max_rounds`` reached."""
        return self.converged or len(self.history) >= self.config.max_rounds

    def state_dict(self) -> dict[str, Any]:
        """Everything needed for an exact resume, as plain lists and numbers (JSON-safe)."""
        return {"psi": self.psi, "history": copy.deepcopy(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        if not isinstance(state, dict) or "psi" not in state or "history" not in state:
            raise ValueError(
                "reward-aware calibrator state must be a dict with 'psi' and 'history'; pass what state_dict() returned"
            )
        psi = state["psi"]
        if psi is not None and (
            not isinstance(psi, list) or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in psi)
        ):
            raise ValueError("reward-aware calibrator state 'psi' must be a list of finite numbers or null")
        low, high = self.bounds
        self._psi = None if psi is None else [min(max(float(v), low), high) for v in psi]
        self.history = copy.deepcopy(list(state["history"]))

    def _psi_for(self, num_steps: int) -> list[float]:
        if self._psi is None:
            self._psi = [float(self.config.initial)] * num_steps
        elif len(self._psi) != num_steps:
            raise ValueError(
                f"reward-aware calibrator holds psi for T = {len(self._psi)} steps but was given T = {num_steps}; "
                "keep sampling.num_steps the same as during calibration, or start a fresh calibration"
            )
        return list(self._psi)
