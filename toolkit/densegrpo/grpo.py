"""The GRPO loop, in the order of method.md section 2:

    rollout -> rewards -> advantages -> per-step clipped loss + KL -> optimizer step

Symbols follow the papers: ``ratio``, ``clip_range`` (epsilon), ``advantages`` (A),
``beta``, ``noise_level`` (a_t or psi(t)), ``sigmas``. Bookkeeping (run folders, metrics
files, checkpoints, plots) lives in :mod:`densegrpo.train`; this module only does maths
and returns numbers.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from densegrpo.build import WeightedReward
from densegrpo.config import TrainConfig
from densegrpo.dense import DenseRewardEngine
from densegrpo.distributed import DataParallel, World
from densegrpo.errors import UserError
from densegrpo.protocols import CalibrationStats, DenseRewards, RewardBatch, Trajectory


@dataclass
class Batch:
    """One rank's share of a global batch. Rows are samples; groups are contiguous globally.

    Attributes:
        prompts: ``n`` prompt strings (the rank's rows).
        metadata: ``n`` GenEval-style metadata dicts (or ``None``).
        noise: ``(n, C, h, w)`` initial noise.
        step_noise: ``(n, T, C, h, w)`` per-step Gaussian draws.
        global_size: ``N``, samples in the whole batch over all ranks.
    """

    prompts: list[str]
    metadata: list[dict[str, Any] | None]
    noise: Tensor
    step_noise: Tensor
    global_size: int


class RewardScorer:
    """Scores decoded images of a batch with the configured rewards.

    ``scorer(images (M,3,H,W), rows (M,))`` binds each image to its sample's prompt and
    metadata and returns the weighted sum ``(M,)`` of the rewards (Flow-GRPO's multi-reward),
    or, with ``per_reward=True``, the raw scores ``(M, R)`` (for a weighted sum of per-reward
    advantages). NaN from a reward makes the sum NaN ("not applicable").
    """

    def __init__(self, rewards: list[WeightedReward], prompts: list[str], metadata: list[dict[str, Any] | None], per_reward: bool = False):
        self.rewards = rewards
        self.prompts = prompts
        self.metadata = metadata
        self.per_reward = per_reward
        self.weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
        self.calls = 0

    def raw(self, images: Tensor, rows: Tensor) -> Tensor:
        """``(M, R)`` raw scores of each reward."""
        index = rows.tolist()
        prompts = [self.prompts[i] for i in index]
        metadata = [self.metadata[i] for i in index]
        self.calls += int(images.shape[0])
        columns = [r.model(images.float(), prompts, metadata).float().reshape(-1).cpu() for r in self.rewards]
        return torch.stack(columns, dim=1)

    def combine(self, raw: Tensor) -> Tensor:
        """Weighted sum over the last dimension ``(..., R) -> (...)``."""
        return (raw * self.weights).sum(dim=-1)

    def __call__(self, images: Tensor, rows: Tensor) -> Tensor:
        raw = self.raw(images, rows)
        return raw if self.per_reward else self.combine(raw)


@dataclass
class Scored:
    """Rollout plus rewards of one iteration, gathered over ranks where it matters."""

    traj: Trajectory
    terminal: Tensor  # (N,) global, weighted sum of the rewards
    dense: DenseRewards | None  # rewards (N, T+1) global, papers' order, weighted sum
    nfe_rollout: int
    nfe_dense: int
    reward_calls: int
    seconds: dict[str, float] = field(default_factory=dict)
    terminal_per_reward: Tensor | None = None  # (N, R) raw, when scoring per reward
    dense_per_reward: Tensor | None = None  # (N, T+1, R) raw, papers' order


def rollout_and_score(
    policy: Any,
    sampler: Any,
    scorer: RewardScorer,
    batch: Batch,
    sigmas: Tensor,
    noise_level: Tensor,
    world: World,
    engine: DenseRewardEngine | None,
    generator: torch.Generator | None = None,
    trained_fraction: float | None = None,
) -> Scored:
    """Steps 1 and 2: sample trajectories with ``noise_level`` and score them.

    With ``engine`` set, every state is scored: ``R_t = R(ODE_n(x_t))`` (DenseGRPO, method.md
    section 3); otherwise only ``R(x_0)`` (Flow-GRPO). With ``trained_fraction`` (the
    ``timestep_fraction`` of a step-local estimator), only the states that the trained steps
    read are scored (see :func:`trained_states`) and the other ``R_t`` are NaN.
    """
    device = policy.device
    started = time.perf_counter()
    with torch.no_grad():
        cond = policy.encode(batch.prompts)
        traj = sampler.rollout(
            policy,
            cond,
            batch.noise.to(device),
            sigmas.to(device),
            noise_level.to(device),
            step_noise=batch.step_noise.to(device),
            generator=generator,
        )
    rolled = time.perf_counter()
    local_rows = torch.arange(traj.num_samples)
    calls_before = scorer.calls
    terminal_raw = dense_raw = None
    with torch.no_grad():
        if engine is not None:
            states = None if trained_fraction is None else trained_states(traj, trained_fraction)
            dense_local = engine(policy, traj, scorer, states)
            gathered = world.gather(dense_local.rewards.float().cpu())
            nfe_dense = int(world.sum(dense_local.nfe))
            if scorer.per_reward:
                dense_raw, terminal_raw = gathered, gathered[:, 0]
                gathered = scorer.combine(gathered)
            dense = DenseRewards(gathered, nfe=nfe_dense, reward_calls=0)
            terminal = dense.terminal
        else:
            values = world.gather(scorer(policy.decode(traj.final), local_rows).float())
            if scorer.per_reward:
                terminal_raw, values = values, scorer.combine(values)
            terminal, dense, nfe_dense = values, None, 0
    scored = time.perf_counter()
    return Scored(
        traj=traj,
        terminal=terminal,
        dense=dense,
        nfe_rollout=int(world.sum(traj.num_samples * traj.num_steps)),
        nfe_dense=nfe_dense,
        reward_calls=int(world.sum(scorer.calls - calls_before)),
        seconds={"rollout_s": rolled - started, "reward_s": scored - rolled},
        terminal_per_reward=terminal_raw,
        dense_per_reward=dense_raw,
    )


def compute_advantages(
    estimator: Any, scored: Scored, group_size: int, advantage_clip: float, weights: list[float] | None = None
) -> Tensor:
    """Step 3: advantages ``(N, T)`` on the global batch, clipped to +-advantage_clip (method.md section 2).

    With per-reward scores in ``scored`` (and their ``weights``), the estimator runs once per
    reward and the advantages are summed with the weights; otherwise it runs on the weighted
    sum of rewards (Flow-GRPO).
    """
    T = scored.traj.num_steps
    use_dense = scored.dense is not None
    if scored.terminal_per_reward is None or weights is None:
        batch = RewardBatch(scored.terminal, scored.dense.rewards if use_dense else None, T, group_size)
        advantages = estimator(batch)
    else:
        from densegrpo.advantages.multi import combine_advantages

        per_reward = []
        for r in range(scored.terminal_per_reward.shape[1]):
            dense_r = scored.dense_per_reward[..., r] if (use_dense and scored.dense_per_reward is not None) else None
            per_reward.append(estimator(RewardBatch(scored.terminal_per_reward[:, r], dense_r, T, group_size)))
        advantages = combine_advantages(per_reward, weights)
    return advantages.float().clamp(-advantage_clip, advantage_clip)


def trained_step_mask(traj: Trajectory, timestep_fraction: float) -> Tensor:
    """``(n, T)`` bool: steps that enter the loss; the last steps are dropped by ``timestep_fraction``."""
    num_train = max(1, int(traj.num_steps * timestep_fraction))
    mask = traj.trained_steps.clone().bool()
    mask[:, num_train:] = False
    return mask


def trained_states(traj: Trajectory, timestep_fraction: float) -> list[int]:
    """Step indices of the states a step-local advantage reads: ``x_k`` and ``x_{k+1}`` of every
    trained step ``k`` (the final sample ``x_T`` is always scored by the engine)."""
    trained = trained_step_mask(traj, timestep_fraction).any(dim=0)
    steps = [k for k in range(traj.num_steps) if bool(trained[k])]
    return sorted(set(steps) | {k + 1 for k in steps})


def local_minibatch(minibatch_size: int, local_samples: int, world_size: int) -> int:
    """Rows of this rank per optimizer step for a global ``minibatch_size`` (0: the whole batch)."""
    if minibatch_size == 0:
        return local_samples
    if minibatch_size % world_size:
        raise UserError(
            f"train.minibatch_size={minibatch_size} does not split evenly over {world_size} processes; "
            "choose a multiple of the number of processes"
        )
    return minibatch_size // world_size


def update_policy(
    policy: Any,
    sampler: Any,
    optimizer: torch.optim.Optimizer,
    traj: Trajectory,
    advantages: Tensor,
    train: TrainConfig,
    parallel: DataParallel,
) -> dict[str, float]:
    """Step 4: per-step clipped surrogate plus KL to the reference, one optimizer step per minibatch.

    ``advantages (n, T)`` are this rank's rows. ``train.minibatch_size`` counts samples of the
    global batch, so each rank takes ``minibatch_size / W`` of its rows per optimizer step and
    the number of steps does not depend on ``W``. Gradients are accumulated over the trained
    steps of a minibatch (loss divided by their count); ``parallel`` (DDP or FSDP, attached to
    the policy) averages them over ranks in the last backward of the minibatch only. Then
    they are clipped by norm and AdamW steps.
    """
    clip_range, beta = train.clip_range, train.beta
    mask = trained_step_mask(traj, train.timestep_fraction)
    parameters = policy.trainable_parameters()
    n = traj.num_samples
    minibatch = local_minibatch(train.minibatch_size, n, parallel.world.world_size)
    totals = {"policy_loss": 0.0, "kl": 0.0, "approx_kl": 0.0, "clipfrac": 0.0, "ratio_dev_max": 0.0, "grad_norm": 0.0}
    terms, updates, nfe_train = 0, 0, 0
    first_ratio_dev = None
    for _epoch in range(train.inner_epochs):
        for start in range(0, n, minibatch):
            rows = list(range(start, min(n, start + minibatch)))
            part = traj.select(rows)
            part_mask = mask[rows]
            steps = [k for k in range(traj.num_steps) if bool(part_mask[:, k].any())]
            for k in steps:
                with parallel.gradient_sync(k == steps[-1]):
                    use = part_mask[:, k]
                    # log p_theta(x_{t-1} | x_t) and its mean, with gradients
                    log_prob, mean = sampler.log_prob(policy, part, k)
                    nfe_train += len(rows)
                    old_log_prob = part.log_probs[:, k]
                    A = advantages[rows, k].to(log_prob.device)
                    # ratio = exp(log p_theta - log p_old)
                    ratio = torch.exp(log_prob - old_log_prob)
                    # L_clip = mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
                    unclipped = -A * ratio
                    clipped = -A * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
                    policy_loss = torch.maximum(unclipped, clipped)[use].mean()
                    # L_kl = (mean_theta - mean_ref)^2 / (2 std_t^2), closed-form Gaussian KL to the base model
                    if beta > 0:
                        with torch.no_grad(), policy.reference():
                            _, mean_ref = sampler.log_prob(policy, part, k)
                        nfe_train += len(rows)
                        std = part.step_std[k].clamp_min(1e-12)
                        kl_per_sample = ((mean - mean_ref) ** 2).flatten(1).mean(dim=1) / (2 * std**2)
                        kl = kl_per_sample[use].mean()
                    else:
                        kl = torch.zeros((), device=log_prob.device)
                    loss = policy_loss + beta * kl
                    (loss / len(steps)).backward()
                with torch.no_grad():
                    deviation = (ratio[use] - 1.0).abs()
                    if first_ratio_dev is None:
                        first_ratio_dev = float(deviation.max())
                    totals["policy_loss"] += float(policy_loss)
                    totals["kl"] += float(kl)
                    totals["approx_kl"] += float(0.5 * ((log_prob - old_log_prob)[use] ** 2).mean())
                    totals["clipfrac"] += float((deviation > clip_range).float().mean())
                    totals["ratio_dev_max"] = max(totals["ratio_dev_max"], float(deviation.max()))
                terms += 1
            grad_norm = torch.nn.utils.clip_grad_norm_(parameters, train.grad_clip)
            totals["grad_norm"] += float(grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            updates += 1
    stats = {k: v / max(terms, 1) for k, v in totals.items() if k not in {"ratio_dev_max", "grad_norm"}}
    stats["ratio_dev_max"] = totals["ratio_dev_max"]
    stats["grad_norm"] = totals["grad_norm"] / max(updates, 1)
    stats["first_step_ratio_dev"] = first_ratio_dev if first_ratio_dev is not None else math.nan
    stats["nfe_train"] = float(parallel.world.sum(nfe_train))
    stats["trained_steps"] = float(sum(1 for k in range(traj.num_steps) if bool(mask[:, k].any())))
    return stats


def dense_gain_stats(dense: DenseRewards | None) -> dict[str, Any]:
    """Per-step mean gain dR and share of positive gains (NaN-aware), for logging; ``None``
    for a step without any scored gain (its states were not scored)."""
    if dense is None:
        return {}
    gains = dense.gains()
    valid = ~torch.isnan(gains)
    count = valid.sum(0)
    mean = torch.where(valid, gains, torch.zeros_like(gains)).sum(0) / count.clamp_min(1)
    positive = ((gains > 0) & valid).sum(0).float() / count.clamp_min(1)

    def per_step(values: Tensor, digits: int) -> list[float | None]:
        return [round(float(v), digits) if int(c) else None for v, c in zip(values, count)]

    return {"dense_gain_mean": per_step(mean, 6), "dense_gain_pos_frac": per_step(positive, 4)}


def calibration_stats(dense: DenseRewards, sigmas: Tensor, noise_level: Tensor) -> CalibrationStats:
    return CalibrationStats(gains=dense.gains(), sigmas=sigmas.cpu(), noise_level=noise_level.cpu())
