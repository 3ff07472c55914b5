"""Step 2 of a GRPO iteration: which rewards an iteration computes, and computing them.

What gets scored is decided once, before training, from what the estimator declares
(:class:`~densegrpo.contracts.protocols.RewardNeeds`) and whether the calibrator learns from the
iteration (online calibration needs every step's gain): a :class:`ScoringPlan`. Scoring then
follows the plan: the terminal reward ``R(x_0)`` only (Flow-GRPO), or ``R_t = R(ODE_n(x_t))``
for the states the estimator reads (DenseGRPO, method.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from densegrpo.contracts.protocols import (
    CalibrationStats,
    DenseRewards,
    Policy,
    RewardBatch,
    RewardNeeds,
    Trajectory,
)
from densegrpo.method.dense import DEFAULT_MAX_BATCH_SIZE, Completion, DenseRewardEngine
from densegrpo.method.distributed import World
from densegrpo.method.reward_scorer import RewardScorer


@dataclass(frozen=True)
class ScoringPlan:
    """What one iteration scores.

    Attributes:
        dense: compute ``R_t`` of the states with the dense-reward engine, not only ``R(x_0)``.
        completion: the engine's ODE completion ``n`` (see :class:`~densegrpo.contracts.protocols.RewardNeeds`).
        step_local: score only the states the trained steps read (:func:`trained_states`).
        per_reward: keep one column per reward model for the estimator (``needs.per_reward``).
        estimator_dense: the estimator reads the dense rewards; when false, dense rewards are
            bought for the calibrator only, and their cost counts as calibration's.
    """

    dense: bool
    completion: Completion = "t"
    step_local: bool = False
    per_reward: bool = False
    estimator_dense: bool = False


def plan_scoring(needs: RewardNeeds, calibrating: bool) -> ScoringPlan:
    """The plan for an iteration whose estimator declares ``needs``; ``calibrating``: the
    calibrator also learns from this iteration's gains, so every state is scored."""
    return ScoringPlan(
        dense=needs.dense or calibrating,
        completion=needs.completion if needs.dense else "t",
        step_local=needs.dense and needs.step_local and not calibrating,
        per_reward=needs.per_reward,
        estimator_dense=needs.dense,
    )


CALIBRATION_PLAN = ScoringPlan(dense=True, completion="t")
"""Calibration rounds before training: every state, completed with all remaining steps."""


@dataclass
class Scores:
    """Rewards of one rollout over the whole batch (gathered over ranks).

    Attributes:
        terminal: ``(N,)`` weighted sum of the rewards of ``x_0``; NaN: not applicable.
        dense: ``(N, T+1)`` weighted dense rewards in the papers' order, or ``None``.
        for_estimator: the :class:`~densegrpo.contracts.protocols.RewardBatch` the estimator reads:
            terminal (and dense, when it asks for them), with a reward axis when it asks for one.
        nfe_dense: completion velocity evaluations bought for the estimator.
        nfe_calibration: completion evaluations bought only for the calibrator.
        reward_calls: images scored.
    """

    terminal: Tensor
    dense: DenseRewards | None
    for_estimator: RewardBatch
    nfe_dense: int
    nfe_calibration: int
    reward_calls: int

    def calibration_stats(self, sigmas: Tensor, noise_level: Tensor) -> CalibrationStats:
        """Gains ``(N, T)`` for the calibrator (dense rewards must have been scored)."""
        assert self.dense is not None, "calibration needs dense rewards; plan the iteration with calibrating=True"
        return CalibrationStats(gains=self.dense.gains(), sigmas=sigmas.cpu(), noise_level=noise_level.cpu())


def score(policy: Policy, traj: Trajectory, scorer: RewardScorer, plan: ScoringPlan, world: World,
          group_size: int, timestep_fraction: float, *, chunk_size: int | None = None) -> Scores:
    """Rewards of this rank's trajectories ``traj`` as ``plan`` says, gathered over ranks.

    ``chunk_size`` (``sampling.chunk_size``): most rows per decode and per reward call, and per
    model call of the dense engine. ``None``: the terminal images in one decode, the engine's
    calls in chunks of :data:`~densegrpo.method.dense.DEFAULT_MAX_BATCH_SIZE`, as always. Every
    rank gathers once whatever its chunks, so the collectives do not depend on ``chunk_size``.
    """
    calls_before = scorer.calls
    with torch.no_grad():
        if plan.dense:
            engine = DenseRewardEngine(completion=plan.completion,
                                       max_batch_size=DEFAULT_MAX_BATCH_SIZE if chunk_size is None else chunk_size)
            states = trained_states(traj, timestep_fraction) if plan.step_local else None
            local = engine(policy, traj, scorer, states)
            per_reward = world.gather(local.rewards.float().cpu())  # (N, T+1, R)
            nfe = int(world.sum(local.nfe))
            dense = DenseRewards(scorer.combine(per_reward), nfe=nfe)
            terminal, terminal_per_reward = dense.terminal, per_reward[:, 0]
        else:
            rows = torch.arange(traj.num_samples)
            local_terminal = decode_and_score(policy, traj.final, scorer, rows, chunk_size)  # (n, R)
            terminal_per_reward = world.gather(local_terminal.float())  # (N, R)
            terminal, dense, per_reward, nfe = scorer.combine(terminal_per_reward), None, None, 0
    use_dense = plan.estimator_dense
    if plan.per_reward:
        batch = RewardBatch(terminal_per_reward, per_reward if use_dense else None, traj.num_steps, group_size)
    else:
        batch = RewardBatch(terminal, dense.rewards if use_dense and dense is not None else None, traj.num_steps, group_size)
    return Scores(
        terminal=terminal,
        dense=dense,
        for_estimator=batch,
        nfe_dense=nfe if use_dense else 0,
        nfe_calibration=0 if use_dense else nfe,
        reward_calls=int(world.sum(scorer.calls - calls_before)),
    )


def decode_and_score(policy: Policy, latents: Tensor, scorer: RewardScorer, rows: Tensor,
                     chunk_size: int | None = None) -> Tensor:
    """Raw scores ``(M, R)`` (CPU float32) of the clean ``latents (M, C, h, w)`` of samples
    ``rows (M,)``: decoded and scored ``chunk_size`` rows at a time (``None``: all in one call),
    so at most one chunk of images (``(chunk, 3, H, W)`` float32, 3 MB each at 512 px) and of
    the decoder's activations is alive at once."""
    if chunk_size is None or chunk_size >= latents.shape[0]:
        return scorer(policy.decode(latents), rows)
    return torch.cat([
        scorer(policy.decode(latents[start:start + chunk_size]), rows[start:start + chunk_size])
        for start in range(0, latents.shape[0], chunk_size)
    ])


def num_trained_steps(num_steps: int, timestep_fraction: float) -> int:
    """How many of the first steps ``timestep_fraction`` trains (at least one)."""
    return max(1, int(num_steps * timestep_fraction))


def trained_step_mask(traj: Trajectory, timestep_fraction: float) -> Tensor:
    """``(n, T)`` bool: steps that enter the loss; the last steps are dropped by ``timestep_fraction``."""
    num_train = num_trained_steps(traj.num_steps, timestep_fraction)
    mask = traj.trained_steps.clone().bool()
    mask[:, num_train:] = False
    return mask


def trained_states(traj: Trajectory, timestep_fraction: float) -> list[int]:
    """Step indices of the states a step-local advantage reads: ``x_k`` and ``x_{k+1}`` of every
    trained step ``k`` (the final sample ``x_T`` is always scored by the engine)."""
    trained = trained_step_mask(traj, timestep_fraction).any(dim=0)
    steps = [k for k in range(traj.num_steps) if bool(trained[k])]
    return sorted(set(steps) | {k + 1 for k in steps})
