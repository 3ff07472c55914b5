"""Shared helpers of the advantage estimators: group normalisation, NaN handling, checks.

GRPO normalises a reward against the other members of its prompt group (method.md
section 3): ``A = (x - mean_group(x)) / (std + 1e-4)``. Groups are contiguous rows
``[g*G, (g+1)*G)`` of the batch (protocols.py).

Conventions, shared by every estimator:

* std is the population std (``ddof = 0``), as Flow-GRPO's ``PerPromptStatTracker``
  (``np.std``) computes it; the statistics are taken in float64 and the advantages
  returned as float32.
* A non-finite value (NaN, "not applicable", or an infinity) gets advantage 0 and is left
  out of the group's mean and std and of the batch std; the estimators count them.
* A zero-variance group (all its finite values equal, or fewer than two of them) gets
  advantage 0 exactly, instead of the rounding noise ``(x - mean) / 1e-4`` would give.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from densegrpo.contracts.protocols import DenseRewards, RewardBatch

STD_EPS = 1e-4
"""Added to the std before dividing (Flow-GRPO, method.md section 3)."""

StdScope = Literal["group", "batch"]


@dataclass
class NormalizeStats:
    """What :func:`group_normalize` saw, for logging.

    Attributes:
        invalid: non-finite input values (they got advantage 0).
        zero_std_cells: group cells (a group, or a group at one timestep) with zero variance.
        cells: group cells holding at least one finite value (cells with none, such as the
            states the dense engine was told to skip, are not counted).
    """

    invalid: int
    zero_std_cells: int
    cells: int

    @property
    def zero_std_ratio(self) -> float:
        return self.zero_std_cells / self.cells if self.cells else 0.0


def group_normalize(
    values: Tensor, group_size: int, std_scope: StdScope = "group", eps: float = STD_EPS, center: bool = True
) -> tuple[Tensor, NormalizeStats]:
    """Normalise ``values`` within each prompt group, column by column.

    Args:
        values: ``(N,)`` or ``(N, T)``; rows are samples, groups are contiguous rows.
            Each column (timestep) is normalised on its own.
        group_size: ``G``; ``N`` must be a multiple of it.
        std_scope: ``"group"``: divide by the group's std (per column); ``"batch"``: by the
            std of all finite values of the batch in that column (Flow-GRPO ``global_std``).
            The mean is always the group's.
        eps: added to the std (``1e-4`` in both papers).
        center: subtract the group mean (GRPO). ``False`` divides the values themselves by
            the std, for values that are already differences against a baseline of their own.

    Returns:
        ``(advantages, stats)``: advantages float32 with the shape of ``values``.
    """
    if std_scope not in ("group", "batch"):
        raise ValueError(f"std_scope must be 'group' or 'batch', got {std_scope!r}")
    num_samples = int(values.shape[0])
    num_groups = num_samples // group_size
    rest = tuple(values.shape[1:])
    x = values.detach().to(torch.float64)
    valid = torch.isfinite(x)
    xg = x.reshape(num_groups, group_size, *rest)
    vg = valid.reshape(num_groups, group_size, *rest)
    count = vg.sum(dim=1)  # (B, *rest)
    safe_count = count.clamp_min(1).to(torch.float64)
    mean = torch.where(vg, xg, 0.0).sum(dim=1) / safe_count
    deviation = torch.where(vg, xg - mean.unsqueeze(1), 0.0)
    largest = torch.where(vg, xg, -math.inf).amax(dim=1)
    smallest = torch.where(vg, xg, math.inf).amin(dim=1)
    zero_variance = (count < 2) | (largest == smallest)  # (B, *rest)

    if std_scope == "group":
        std = ((deviation**2).sum(dim=1) / safe_count).sqrt().unsqueeze(1)
    else:
        batch_count = valid.sum(dim=0).clamp_min(1).to(torch.float64)
        batch_mean = torch.where(valid, x, 0.0).sum(dim=0) / batch_count
        batch_var = (torch.where(valid, x - batch_mean, 0.0) ** 2).sum(dim=0) / batch_count
        std = batch_var.sqrt().unsqueeze(0).unsqueeze(0)  # broadcast over (B, G)

    numerator = deviation if center else torch.where(vg, xg, 0.0)
    advantages = numerator / (std + eps)
    advantages = torch.where(vg & ~zero_variance.unsqueeze(1), advantages, 0.0)
    scored = count > 0  # a cell with no finite value at all (a state not scored) is left out
    stats = NormalizeStats(
        invalid=int((~valid).sum()),
        zero_std_cells=int((zero_variance & scored).sum()),
        cells=int(scored.sum()),
    )
    return advantages.reshape(values.shape).to(torch.float32), stats


def check_batch(rewards: RewardBatch, *, dense: bool, estimator: str) -> None:
    """Validate the shapes of a :class:`RewardBatch`; raise ``ValueError`` naming the fix."""
    terminal = rewards.terminal
    if not isinstance(terminal, Tensor) or terminal.dim() != 1 or terminal.shape[0] == 0:
        shape = tuple(terminal.shape) if isinstance(terminal, Tensor) else type(terminal).__name__
        raise ValueError(f"{estimator}: RewardBatch.terminal must be a non-empty (N,) tensor, got {shape}")
    num_samples = int(terminal.shape[0])
    group_size, num_steps = rewards.group_size, rewards.num_steps
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"{estimator}: RewardBatch.group_size must be a positive int, got {group_size!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"{estimator}: RewardBatch.num_steps must be a positive int, got {num_steps!r}")
    if num_samples % group_size:
        raise ValueError(
            f"{estimator}: {num_samples} samples do not split into groups of {group_size}; "
            "make N a multiple of the group size G"
        )
    if rewards.dense is None:
        if dense:
            raise ValueError(
                f"{estimator} needs dense rewards R_t for every step, but RewardBatch.dense is None; "
                "compute them with the dense-reward engine (the estimator's `needs.dense` is True)"
            )
        return
    expected = (num_samples, num_steps + 1)
    if tuple(rewards.dense.shape) != expected:
        raise ValueError(
            f"{estimator}: RewardBatch.dense must have shape (N, T+1) = {expected}, "
            f"got {tuple(rewards.dense.shape)}"
        )


def dense_gains(rewards: RewardBatch) -> Tensor:
    """``(N, T)`` step-aligned gains ``dR`` of step ``k``: ``R_{t-1} - R_t`` with ``t = T - k``."""
    assert rewards.dense is not None
    return DenseRewards(rewards.dense.to(torch.float32)).gains()


def summarize(advantages: Tensor, stats: NormalizeStats, nan_rewards: int) -> dict[str, float]:
    """The ``last_stats`` every estimator exposes.

    Keys: ``nan_rewards`` (non-finite rewards in the input), ``nan_advantages`` (entries of
    the ``(N, T)`` output set to 0 because their input was non-finite), ``zero_std_ratio``
    (share of group cells with zero variance) and ``advantage_abs_mean``.
    """
    return {
        "nan_rewards": float(nan_rewards),
        "nan_advantages": float(stats.invalid),
        "zero_std_ratio": float(stats.zero_std_ratio),
        "advantage_abs_mean": float(advantages.abs().mean()) if advantages.numel() else 0.0,
    }


_T_OVER_C = re.compile(r"^t\s*/\s*(\d+)$")


def canonical_completion(value: Any) -> int | str:
    """Validate an ODE-completion setting ``n`` (method.md section 3, ``RewardNeeds``).

    Accepts ``"t"`` (all remaining steps, the paper), a positive int ``k`` (or its digit
    string) and ``"t/C"`` with a positive int ``C``; returns ``"t"``, an int or ``"t/C"``.
    """
    hint = "use 't' (the paper), a positive integer such as 2, or 't/C' such as 't/2'"
    if isinstance(value, bool):
        raise ValueError(f"completion must not be a boolean; {hint}")
    if isinstance(value, int):
        if value < 1:
            raise ValueError(f"completion must be at least 1 ODE step, got {value}; {hint}")
        return value
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "t":
            return "t"
        if text.isdigit():
            return canonical_completion(int(text))
        match = _T_OVER_C.match(text)
        if match:
            divisor = int(match.group(1))
            if divisor < 1:
                raise ValueError(f"completion 't/C' needs C >= 1, got {value!r}; {hint}")
            return "t" if divisor == 1 else f"t/{divisor}"
    raise ValueError(f"completion {value!r} is not understood; {hint}")
