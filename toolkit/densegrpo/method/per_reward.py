"""Multi-reward advantages as a weighted sum of per-reward advantages (``reward_combine:
sum-advantages``).

With rewards ``r = 1 .. R`` of weights ``w_r``, the wrapped estimator runs once per reward on
that reward's raw scores and the advantages are summed:  ``A = sum_r w_r * A_r``.
Normalising each reward on its own keeps a reward with a large raw scale from drowning the
others (the alternative, Flow-GRPO's default, sums the raw rewards first).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Sequence

from torch import Tensor

from densegrpo.contracts.protocols import AdvantageEstimator, RewardBatch
from densegrpo.method.multi_reward import combine_advantages


class PerRewardAdvantage:
    """Runs ``estimator`` on each reward's column and sums the advantages with ``weights``.

    Input: ``RewardBatch.terminal (N, R)`` and ``dense (N, T+1, R)`` (or ``None``), one
    column per reward, unweighted (``needs.per_reward`` is true, so the loop keeps the axis).
    Output: advantages ``(N, T)`` float32. ``last_stats`` are those of the last reward's call.
    Built by :func:`densegrpo.run.build.build` for ``reward_combine: sum-advantages`` with several
    rewards; not a registered component (it wraps one).
    """

    def __init__(self, estimator: AdvantageEstimator, weights: Sequence[float]) -> None:
        self.estimator = estimator
        self.weights = [float(w) for w in weights]
        self.needs = replace(estimator.needs, per_reward=True)
        self.last_stats: dict[str, Any] = {}

    def __call__(self, rewards: RewardBatch) -> Tensor:
        """``terminal (N, R)``, ``dense (N, T+1, R)`` -> advantages ``(N, T)``."""
        if rewards.terminal.dim() != 2 or rewards.terminal.shape[1] != len(self.weights):
            raise ValueError(
                f"per-reward advantages need terminal rewards of shape (N, {len(self.weights)}), one column per reward; "
                f"got {tuple(rewards.terminal.shape)}"
            )
        per_reward = []
        for r in range(len(self.weights)):
            dense = None if rewards.dense is None else rewards.dense[..., r]
            per_reward.append(self.estimator(RewardBatch(rewards.terminal[:, r], dense, rewards.num_steps, rewards.group_size)))
        self.last_stats = dict(self.estimator.last_stats)
        return combine_advantages(per_reward, self.weights)
