"""Several rewards in one run: combine raw rewards, or combine per-reward advantages.

method.md section 5, "Multi-reward":
* :func:`combine_rewards` takes the weighted sum of raw scores *before* normalisation
  (Flow-GRPO, whose ``multi_score`` sums ``weight * score``); one estimator then sees one
  reward.
* :func:`combine_advantages` takes the weighted sum of advantages that one estimator
  computed for each reward on its own (what some peers offer), so a reward with a large
  raw scale cannot drown the others.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from densegrpo.contracts.protocols import RewardBatch


def _check_weights(weights: Sequence[float], count: int, what: str) -> list[float]:
    values = [float(w) for w in weights]
    if len(values) != count:
        raise ValueError(f"got {count} {what} but {len(values)} weights; pass one weight per {what[:-1]}")
    if not all(math.isfinite(w) for w in values):
        raise ValueError(f"reward weights must be finite numbers, got {values}")
    return values


def _weighted_sum(tensors: list[Tensor], weights: list[float], skip_nan: bool) -> Tensor:
    """Weighted sum in float64 -> float32; with ``skip_nan`` a NaN term is left out, and
    the sum is NaN only where every term is NaN."""
    stacked = torch.stack([t.to(torch.float64) for t in tensors])  # (R, ...)
    w = torch.tensor(weights, dtype=torch.float64, device=stacked.device).reshape(-1, *[1] * (stacked.dim() - 1))
    if not skip_nan:
        return (w * stacked).sum(0).to(torch.float32)
    finite = torch.isfinite(stacked)
    total = torch.where(finite, w * stacked, 0.0).sum(0)
    return torch.where(finite.any(0), total, math.nan).to(torch.float32)


def combine_rewards(
    batches: Sequence[RewardBatch], weights: Sequence[float], *, skip_nan: bool = True
) -> RewardBatch:
    """Weighted sum of raw rewards, before any normalisation (Flow-GRPO multi-reward).

    Args:
        batches: one :class:`RewardBatch` per reward model, all with the same ``N``, ``T``,
            ``G``; either all carry ``dense (N, T+1)`` or none does.
        weights: one float per batch.
        skip_nan: NaN means "this reward does not apply to this prompt" (e.g. OCR on a
            prompt without quoted text). ``True`` (default): leave the NaN term out of the
            sum, so the sample is scored by the rewards that apply, and the sum is NaN only
            where no reward applies. ``False``: any NaN term makes the sum NaN (the sample
            then gets advantage 0).

    Returns:
        One :class:`RewardBatch`: ``terminal (N,)`` and ``dense (N, T+1)`` or ``None``, float32.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("combine_rewards needs at least one RewardBatch")
    values = _check_weights(weights, len(batches), "reward batches")
    first = batches[0]
    for index, batch in enumerate(batches[1:], start=1):
        if tuple(batch.terminal.shape) != tuple(first.terminal.shape):
            raise ValueError(
                f"reward {index} scored {tuple(batch.terminal.shape)} samples but reward 0 scored "
                f"{tuple(first.terminal.shape)}; score the same batch with every reward"
            )
        if (batch.num_steps, batch.group_size) != (first.num_steps, first.group_size):
            raise ValueError(
                f"reward {index} has (T, G) = ({batch.num_steps}, {batch.group_size}) but reward 0 has "
                f"({first.num_steps}, {first.group_size}); combine rewards of the same rollout only"
            )
        if (batch.dense is None) != (first.dense is None):
            raise ValueError(
                "some rewards carry dense rewards and some do not; compute dense rewards for all of them or none"
            )
        if batch.dense is not None and first.dense is not None and batch.dense.shape != first.dense.shape:
            raise ValueError(
                f"reward {index} has dense rewards of shape {tuple(batch.dense.shape)} but reward 0 has "
                f"{tuple(first.dense.shape)}; combine rewards of the same rollout only"
            )
    terminal = _weighted_sum([b.terminal for b in batches], values, skip_nan)
    dense = None
    if first.dense is not None:
        dense = _weighted_sum([b.dense for b in batches], values, skip_nan)  # type: ignore[misc]
    return RewardBatch(terminal=terminal, dense=dense, num_steps=first.num_steps, group_size=first.group_size)


def combine_advantages(estimator_outputs: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Weighted sum of per-reward advantages.

    Args:
        estimator_outputs: one ``(N, T)`` advantage tensor per reward (an estimator already
            turned NaN rewards into 0).
        weights: one float per tensor.

    Returns:
        ``(N, T)`` float32, ``sum_r weights[r] * estimator_outputs[r]``.
    """
    outputs = list(estimator_outputs)
    if not outputs:
        raise ValueError("combine_advantages needs at least one advantage tensor")
    values = _check_weights(weights, len(outputs), "advantage tensors")
    for index, output in enumerate(outputs):
        if output.dim() != 2 or output.shape != outputs[0].shape:
            raise ValueError(
                f"advantage tensor {index} has shape {tuple(output.shape)}; every estimator must return the "
                f"same (N, T) shape, here {tuple(outputs[0].shape)}"
            )
    return _weighted_sum(outputs, values, skip_nan=False)
