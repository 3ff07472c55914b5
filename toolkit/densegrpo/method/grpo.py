"""One GRPO iteration, in the order of method.md sections 2 and 3:

    rollout -> rewards -> advantages -> per-step clipped loss + KL -> optimizer step

:func:`iteration` is the whole algorithm; it returns numbers. Symbols follow the papers:
``ratio``, ``clip_range`` (epsilon), ``advantages`` (A), ``beta``, ``noise_level`` (a_t or
psi(t)), ``sigmas``. Bookkeeping (calibration rounds, evaluation, checkpoints, metrics,
pictures) are hooks around it (:mod:`densegrpo.run.hooks`), run by :mod:`densegrpo.run.train`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from densegrpo.contracts.config import TrainConfig
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import (
    AdvantageEstimator,
    DenseRewards,
    Policy,
    Sampler,
    Trajectory,
)
from densegrpo.method.batch import Batch
from densegrpo.method.distributed import DataParallel, World
from densegrpo.method.noise import generator_for
from densegrpo.method.ratio_norm import normalized_log_ratio
from densegrpo.method.reward_scorer import RewardScorer
from densegrpo.method.rewarding import (
    Scores,
    ScoringPlan,
    num_trained_steps,
    score,
    trained_step_mask,
)
from densegrpo.method.step_grad_norms import StepGradNorms
from densegrpo.method.step_weighting import step_weights


@dataclass
class Learner:
    """What an iteration reads and updates.

    Attributes:
        policy, sampler, estimator: the run's components.
        optimizer: AdamW over ``policy.trainable_parameters()``.
        parallel: DDP/FSDP wrapper state (a no-op in one process).
        train: the objective's settings (method.md section 2).
        sigmas: ``(T+1,)`` the sampling grid, from 1 to 0.
        chunk_size: ``sampling.chunk_size``, rows per no-grad model call and per decode in the
            rollout and the scoring (``None``: the whole batch at once, the dense engine 256).
    """

    policy: Policy
    sampler: Sampler
    estimator: AdvantageEstimator
    optimizer: torch.optim.Optimizer
    parallel: DataParallel
    train: TrainConfig
    sigmas: Tensor
    chunk_size: int | None = None

    @property
    def world(self) -> World:
        return self.parallel.world


@dataclass
class IterationResult:
    """What :func:`iteration` returns: its ``numbers`` (one metrics record, without the
    iteration index), the ``scores`` (the calibrator learns from their gains) and the
    ``noise_level (T,)`` the rollout used."""

    numbers: dict[str, Any]
    scores: Scores
    noise_level: Tensor


def iteration(learner: Learner, batch: Batch, noise_level: Tensor, plan: ScoringPlan, scorer: RewardScorer,
              generator: torch.Generator | None = None, *, order_keys: tuple[int, ...] = ()) -> IterationResult:
    """One GRPO iteration on this rank's share ``batch`` of the global batch.

    ``noise_level (T,)`` is the SDE noise level of every step (a, or the calibrated psi);
    ``plan`` says what is scored; ``scorer`` binds the batch's prompts to the rewards.
    ``order_keys`` (the run's seed and the iteration) seed the minibatch order when
    ``train.shuffle_minibatches`` is on (:func:`minibatch_order`).
    """
    train = learner.train
    started = time.perf_counter()
    # 1. rollout: T SDE steps from x_T ~ N(0, I), with the old policy's log-probs
    traj = rollout(learner.policy, learner.sampler, batch, learner.sigmas, noise_level, generator,
                   chunk_size=learner.chunk_size)
    rolled = time.perf_counter()
    # 2. rewards: R(x_0), or R_t = R(ODE_n(x_t)) for every state the advantages read
    scores = score(learner.policy, traj, scorer, plan, learner.world, train.group_size, train.timestep_fraction,
                   chunk_size=learner.chunk_size)
    scored = time.perf_counter()
    # 3. advantages A (N, T) over the global batch, clipped to +-advantage_clip; then this rank's rows
    advantages = learner.estimator(scores.for_estimator).float().clamp(-train.advantage_clip, train.advantage_clip)
    local_advantages = advantages[learner.world.shard(batch.global_size)]
    dropped = zero_advantage_rows(advantages) if train.drop_zero_advantage else None
    # 4. per-step clipped surrogate + beta * KL to the reference, optimizer step(s)
    update = update_policy(learner, traj, local_advantages, dropped, order_keys)
    seconds = {"iteration_s": time.perf_counter() - started, "rollout_s": rolled - started, "reward_s": scored - rolled}
    numbers = iteration_numbers(learner, traj, scores, noise_level, advantages, update, seconds)
    return IterationResult(numbers, scores, noise_level)


def rollout(policy: Policy, sampler: Sampler, batch: Batch, sigmas: Tensor, noise_level: Tensor,
            generator: torch.Generator | None = None, *, chunk_size: int | None = None) -> Trajectory:
    """Step 1: sample ``batch``'s trajectories (no gradients), ``latents (n, T+1, C, h, w)``.

    ``chunk_size`` (``sampling.chunk_size``): at most this many samples per ``sampler.rollout``
    call, hence per model call (``None``: all ``n`` in one call). A sample's trajectory depends
    only on its own ``noise``, its ``step_noise`` row and its prompt, so the chunks, stacked by
    :meth:`Trajectory.concat`, are the unchunked trajectory up to the float rounding of smaller
    model batches. ``step_noise`` is always given (the batch draws it), so no built-in sampler
    draws from ``generator``; the SDE-window sampler seeds its window by
    ``generator.initial_seed()``, which every chunk reads alike. Each chunk's rows of the
    noise go to the device with it: only the trajectory itself is held for all ``n``.
    """
    device = policy.device
    with torch.no_grad():
        cond = policy.encode(batch.prompts)
        num_samples = len(cond)
        if chunk_size is None or chunk_size >= num_samples:
            return sampler.rollout(
                policy,
                cond,
                batch.noise.to(device),
                sigmas.to(device),
                noise_level.to(device),
                step_noise=batch.step_noise.to(device),
                generator=generator,
            )
        sigmas, noise_level = sigmas.to(device), noise_level.to(device)
        chunks = (range(start, min(num_samples, start + chunk_size)) for start in range(0, num_samples, chunk_size))
        # a generator of parts: concat copies each into the result and drops it before the next is sampled
        parts = (
            sampler.rollout(
                policy,
                cond.select(rows),  # this chunk's rows of the embeddings, freed with the part
                batch.noise[rows.start:rows.stop].to(device),
                sigmas,
                noise_level,
                step_noise=batch.step_noise[rows.start:rows.stop].to(device),
                generator=generator,
            )
            for rows in chunks
        )
        return Trajectory.concat(parts, cond)


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


def zero_advantage_rows(advantages: Tensor) -> Tensor:
    """``advantages (N, T)`` -> ``(N,)`` bool: the samples whose advantage is zero at every step,
    which Flow-GRPO leaves out of the loss (``train.drop_zero_advantage``)."""
    return (advantages == 0).all(dim=1)


@dataclass
class StepLoss:
    """The loss of one denoising step ``k`` on a minibatch, and what is logged about it
    (``rows``: the rows it averages over; with 0 the numbers are NaN and not logged)."""

    loss: Tensor
    policy_loss: float
    kl: float
    approx_kl: float
    clipfrac: float
    ratio_dev_max: float
    rows: int = 1


def kl_std(traj: Trajectory, form: str) -> Tensor:
    """``(T,)`` the std ``s`` the KL term ``(mean - mean_ref)^2 / (2 s^2)`` divides by (``train.kl``):
    ``std_t`` without ``sqrt(-dt)`` for ``"flow-grpo"``, the transition std ``step_std`` for ``"exact"``."""
    return traj.std_t if form == "flow-grpo" else traj.step_std


def rows_mean(values: Tensor, use: Tensor) -> Tensor:
    """Mean of ``values (n,)`` over the rows ``use (n,)``; with no row, a zero that keeps the graph."""
    return values[use].mean() if bool(use.any()) else 0.0 * values.sum()


def step_loss(policy: Policy, sampler: Sampler, part: Trajectory, k: int, A: Tensor, use: Tensor, train: TrainConfig,
              step_weight: float = 1.0) -> StepLoss:
    """Step ``k``'s clipped surrogate plus KL (method.md section 2) on the rows of ``part``.

    ``A (n,)`` are the rows' advantages at step ``k``; ``use (n,)`` marks the rows trained at ``k``.
    ``step_weight`` is the step's ``w_k`` on the policy term (:func:`densegrpo.method.step_weighting.step_weights`).
    With no row in ``use`` the loss is a zero that still depends on the weights, so a rank whose
    rows were all dropped runs the same forward and backward passes as the others (DDP, FSDP).
    """
    clip_range, beta = train.clip_range, train.beta
    with policy.loss_forward(cfg_grad=train.cfg_grad):
        # log p_theta(x_{t-1} | x_t) and its mean, with gradients
        log_prob, mean = sampler.log_prob(policy, part, k)
        old_log_prob = part.log_probs[:, k]
        A = A.to(log_prob.device)
        # ratio = exp(log p_theta - log p_old)
        log_ratio = log_prob - old_log_prob
        if train.ratio_norm:
            # GRPO-Guard's RatioNorm: s (log r - E_old[log r]), centred on 0, its spread free of the noise level
            step_std = float(part.step_std[k])
            expected = sampler.expected_log_ratio(mean, part.means[:, k], step_std)
            log_ratio = normalized_log_ratio(log_ratio, expected, step_std)
        ratio = torch.exp(log_ratio)
        # L_clip = w_k * mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)))
        unclipped = -A * ratio
        clipped = -A * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
        policy_loss = rows_mean(torch.maximum(unclipped, clipped), use)
        if step_weight != 1.0:
            policy_loss = step_weight * policy_loss
        # L_kl = (mean_theta - mean_ref)^2 / (2 s^2) to the base model; s = std_t (Flow-GRPO) or
        # s = std_t sqrt(-dt), the closed-form KL of the Gaussian transitions (train.kl)
        if beta > 0:
            with torch.no_grad(), policy.reference():
                _, mean_ref = sampler.log_prob(policy, part, k)
            std = kl_std(part, train.kl)[k].clamp_min(1e-12)
            kl = rows_mean(((mean - mean_ref) ** 2).flatten(1).mean(dim=1) / (2 * std**2), use)
        else:
            kl = torch.zeros((), device=log_prob.device)
    loss = policy_loss + beta * kl
    if not bool(use.any()):
        return StepLoss(loss, math.nan, math.nan, math.nan, math.nan, math.nan, rows=0)
    with torch.no_grad():
        deviation = (ratio[use] - 1.0).abs()
        return StepLoss(
            loss=loss,
            policy_loss=float(policy_loss),
            kl=float(kl),
            approx_kl=float(0.5 * ((log_prob - old_log_prob)[use] ** 2).mean()),
            clipfrac=float((deviation > clip_range).float().mean()),
            ratio_dev_max=float(deviation.max()),
        )


def minibatches(local_samples: int, world_size: int, minibatch: int, order: Tensor | None = None) -> list[Tensor]:
    """One inner epoch's minibatches, each ``(W, n)`` bool: entry ``[r, i]`` marks row ``i`` of rank ``r``.

    ``n = local_samples`` rows per rank and ``m = minibatch`` of them per optimizer step
    (:func:`local_minibatch`); rank ``r`` owns rows ``r n .. r n + n - 1`` of the global batch of
    ``N = W n`` (:meth:`~densegrpo.method.distributed.World.shard`).

    * ``order`` ``None`` (``train.shuffle_minibatches: false``): each rank walks its own rows in
      order, so minibatch ``j`` holds rows ``j m .. j m + m - 1`` of every rank. With ``W > 1`` and
      more than one minibatch, that is every rank's first rows, not the first rows of the batch.
    * ``order (N,)``, a permutation of the global batch's rows (shuffled, as Flow-GRPO's ``randperm``):
      minibatch ``j`` is the global rows ``order[j M : (j + 1) M]``, ``M = W m``, and each rank takes
      the ones it owns. Every rank draws the same ``order``, and it is drawn over the global batch, so
      a minibatch is the same set of samples for any number of processes and ``W`` processes take the
      same optimizer steps as one. The price: a rank's share of a minibatch is ``m`` on average, not
      exactly (hypergeometric: 72 +- 5.6 for the SD3.5-M recipes' 1152 samples, minibatches of 576,
      on 8 ranks), which :func:`rank_share` weighs so the gradient is the minibatch's mean, and the
      ranks wait for the busiest one. Permuting within each rank's rows instead would keep the shares
      equal but make the minibatches, hence the run, depend on ``W``.
    """
    n = local_samples
    batches = []
    if order is None:
        for start in range(0, n, minibatch):
            members = torch.zeros(world_size, n, dtype=torch.bool)
            members[:, start:start + minibatch] = True
            batches.append(members)
        return batches
    size = minibatch * world_size
    for start in range(0, n * world_size, size):
        members = torch.zeros(n * world_size, dtype=torch.bool)
        members[order[start:start + size]] = True
        batches.append(members.reshape(world_size, n))
    return batches


def rank_share(members: Tensor, kept: Tensor | None, rank: int) -> tuple[list[int], float] | None:
    """This rank's rows of one minibatch that enter the loss, and the weight of its loss.

    ``members (W, n)`` bool marks every rank's rows of the minibatch (:func:`minibatches`); ``kept
    (W, n)`` bool the rows kept in the loss (``None``: all, ``train.drop_zero_advantage``). The
    weight, this rank's rows in the loss over their mean over ranks, turns DDP's average of the
    ranks' means into the mean over every row of the minibatch in the loss, as in one process (1
    when every rank has as many). ``None`` when no rank has a row in the loss (no optimizer step);
    a rank without one gets ``([i], 0.0)``: a row it runs, unused, so it still takes part in the
    backward passes (its first row of the minibatch, else its row 0).
    """
    in_loss = members if kept is None else members & kept
    counts = in_loss.sum(dim=1)
    total = int(counts.sum())
    if total == 0:
        return None
    mine = in_loss[rank].nonzero().flatten().tolist()
    if not mine:
        return members[rank].nonzero().flatten().tolist()[:1] or [0], 0.0
    return mine, float(counts[rank]) * members.shape[0] / total


def kept_rows(kept: Tensor | None, rows: list[int], rank: int) -> tuple[list[int], float] | None:
    """:func:`rank_share` of a minibatch made of the same ``rows`` on every rank (unshuffled)."""
    if kept is None:
        return rows, 1.0
    members = torch.zeros_like(kept)
    members[:, rows] = True
    return rank_share(members, kept, rank)


def micro_batch_count(members: Tensor, kept: Tensor | None, micro_batch_size: int | None) -> int:
    """Micro-batches per trained step of the minibatch ``members (W, n)``: as many as its busiest
    rank needs for ``train.micro_batch_size`` rows each (1 for ``None``). Every rank runs that many,
    so all run the same forward passes (FSDP gathers the weights in each) even when dropped rows or
    shuffling leave them different numbers of rows."""
    if micro_batch_size is None:
        return 1
    busiest = int((members if kept is None else members & kept).sum(dim=1).max())
    return max(1, -(-busiest // micro_batch_size))


def micro_batches(used: list[int], weight: float, count: int) -> list[tuple[list[int], bool]]:
    """This rank's rows of a minibatch as ``count`` micro-batches ``(rows, trained)``.

    ``used`` and ``weight`` are :func:`rank_share`'s. The rows are cut into ``count`` consecutive
    runs whose sizes differ by at most one; a run left empty (fewer rows than ``count``, or a rank
    of weight 0) runs the row ``used[:1]`` untrained (``trained`` false): a forward and a backward of
    a zero loss, which keeps the ranks' passes in step.
    """
    if count == 1:
        return [(used, weight > 0)]
    size, extra = divmod(len(used) if weight > 0 else 0, count)
    runs, start = [], 0
    for index in range(count):
        stop = start + size + (1 if index < extra else 0)
        runs.append((used[start:stop], True) if stop > start else (used[:1], False))
        start = stop
    return runs


def merged_step_loss(terms: list[StepLoss], counts: list[int]) -> StepLoss:
    """One step's :class:`StepLoss` on a minibatch from those of its micro-batches, ``counts`` rows
    in the loss each: row-weighted means, the largest ratio deviation; so the logged numbers are
    those of the whole minibatch in one forward (a single term is returned as it is)."""
    if len(terms) == 1:
        return terms[0]
    live = [(t, c) for t, c in zip(terms, counts) if c and t.rows]
    total = sum(c for _, c in live)
    if not total:
        return StepLoss(terms[-1].loss, math.nan, math.nan, math.nan, math.nan, math.nan, rows=0)
    return StepLoss(
        loss=terms[-1].loss,
        policy_loss=sum(t.policy_loss * c for t, c in live) / total,
        kl=sum(t.kl * c for t, c in live) / total,
        approx_kl=sum(t.approx_kl * c for t, c in live) / total,
        clipfrac=sum(t.clipfrac * c for t, c in live) / total,
        ratio_dev_max=max(t.ratio_dev_max for t, _ in live),
        rows=total,
    )


def minibatch_order(train: TrainConfig, global_size: int, order_keys: tuple[int, ...], epoch: int) -> Tensor | None:
    """``(N,)`` the permutation inner epoch ``epoch`` cuts into minibatches (``None``: in order,
    ``train.shuffle_minibatches: false``). Seeded from ``order_keys`` (the run's seed and the
    iteration) and ``epoch`` only, so every rank draws the same one and a resumed run the same as
    the uninterrupted one; drawn on the CPU, so it does not depend on the device either."""
    if not train.shuffle_minibatches:
        return None
    if not order_keys:
        raise ValueError("train.shuffle_minibatches needs order_keys, the integers the minibatch order is seeded from "
                         "(the run's seed and the iteration); pass them to update_policy")
    return torch.randperm(global_size, generator=generator_for(*order_keys, epoch))


def update_policy(learner: Learner, traj: Trajectory, advantages: Tensor, dropped: Tensor | None = None,
                  order_keys: tuple[int, ...] = ()) -> dict[str, Any]:
    """Step 4: :func:`step_loss` over the trained steps, one optimizer step per minibatch.

    ``advantages (n, T)`` are this rank's rows. ``train.minibatch_size`` counts samples of the
    global batch, so each rank takes ``minibatch_size / W`` of its rows per optimizer step (on
    average, when shuffled) and the number of steps does not depend on ``W`` (:func:`minibatches`;
    ``train.shuffle_minibatches`` permutes the batch per inner epoch, seeded by ``order_keys`` and
    the epoch: :func:`minibatch_order`). Gradients are accumulated over the trained steps of a
    minibatch (loss divided by their count); ``parallel`` (DDP or FSDP, attached to the policy)
    averages them over ranks in the last backward of the minibatch only. Then they are clipped by
    norm and AdamW steps. ``dropped (N,)`` bool over the global batch (``None``: none) marks samples
    left out of the loss (``train.drop_zero_advantage``): a minibatch runs on its kept rows only
    (:func:`rank_share`), and one without any makes no step. Step ``k``'s policy term is weighted by
    its ``w_k`` of ``train.step_weighting`` (1 by default).

    ``train.micro_batch_size`` (``None``: one forward per step on all the rank's rows of the
    minibatch): each step's forward and backward run on micro-batches of at most that many rows
    (:func:`micro_batches`, as many on every rank: :func:`micro_batch_count`). The step's loss is a
    mean over its rows in the loss, so micro-batch ``c`` with ``u_c`` of the ``u`` such rows scales
    its own mean by ``u_c / u`` (then by the rank's weight and ``1 / len(steps)`` as above): the
    accumulated gradient is the unchunked one up to float rounding, and so are the optimizer steps,
    their number and the logged numbers (:func:`merged_step_loss`). Only activations of one
    micro-batch are alive at a time; the gradient meter then keeps one copy of the trainable
    weights' gradient to sum a step's micro-batches before taking its norm.

    Which rows run where is bookkeeping on the CPU, computed alike on every rank with no collective
    from what every rank holds: ``kept (W, n)``, each minibatch's ``members (W, n)`` and the order
    ``(N,)`` (1152 entries each for the SD3.5-M recipes). On the policy's device are ``mask (n, T)``
    and each micro-batch's copy of its trajectory rows (``traj.select``: at 512 px about 8 MB per
    sample of latents, means and velocities, plus its prompt embeddings).

    Besides the means it returns ``clipfrac_per_step`` and ``grad_norm_per_step``, lists ``(T,)``
    (``None`` for a step not trained): step ``k``'s clip fraction and the norm of the gradient of
    its own loss before clipping, on this rank's rows (:class:`~densegrpo.method.step_grad_norms.StepGradNorms`;
    not measured with sharded weights), each averaged over the minibatches and epochs.
    """
    train, parallel, policy = learner.train, learner.parallel, learner.policy
    mask = trained_step_mask(traj, train.timestep_fraction)
    weights = step_weights(traj.sigmas, traj.step_std, mask.any(dim=0), train.step_weighting).tolist()
    n, world = traj.num_samples, parallel.world
    minibatch = local_minibatch(train.minibatch_size, n, world.world_size)
    kept = None if dropped is None else ~dropped.cpu().reshape(world.world_size, n)
    losses: list[StepLoss] = []
    grad_norms: list[float] = []
    # step k's clip fraction and the norm of the gradient of its own loss, per minibatch
    by_step: dict[str, list[list[float]]] = {"clipfrac": [[] for _ in range(traj.num_steps)], "grad_norm": [[] for _ in range(traj.num_steps)]}
    nfe_train = 0
    # with micro-batches a step's gradient arrives in several backward passes: the meter sums them
    accumulate = train.micro_batch_size is not None
    with StepGradNorms(policy.trainable_parameters(), enabled=not parallel.sharded, accumulate=accumulate) as meter:
        for epoch in range(train.inner_epochs):
            order = minibatch_order(train, n * world.world_size, order_keys, epoch)
            for members in minibatches(n, world.world_size, minibatch, order):
                share = rank_share(members, kept, world.rank)
                if share is None:
                    continue
                used, weight = share
                rows = members[world.rank].nonzero().flatten().tolist()  # empty when shuffling gave this rank none
                runs = micro_batches(used, weight, micro_batch_count(members, kept, train.micro_batch_size))
                # one micro-batch: its copy is taken once for all steps, as without micro-batching
                parts = [traj.select(run) for run, _ in runs] if len(runs) == 1 else None
                steps = [k for k in range(traj.num_steps) if bool(mask[rows or used, k].any())]
                for k in steps:
                    uses = [mask[run, k] if trained else torch.zeros_like(mask[run, k]) for run, trained in runs]
                    counts = [int(use.sum()) for use in uses] if len(runs) > 1 else [1]
                    in_step = sum(counts)
                    terms = []
                    for index, ((run, _), use) in enumerate(zip(runs, uses)):
                        part = parts[index] if parts is not None else traj.select(run)  # one micro-batch's rows at a time
                        with parallel.gradient_sync(k == steps[-1] and index == len(runs) - 1):
                            term = step_loss(policy, learner.sampler, part, k, advantages[run, k], use, train, weights[k])
                            loss = term.loss if weight == 1.0 else term.loss * weight
                            if len(runs) > 1:  # the step's mean over its rows, in parts: each weighs by its share
                                loss = loss * (counts[index] / in_step if in_step else 0.0)
                            (loss / len(steps)).backward()
                        terms.append(term)
                    term = merged_step_loss(terms, counts)
                    step_norm = meter.take()  # of loss * weight / len(steps): undo both scales
                    if term.rows and weight > 0:
                        by_step["clipfrac"][k].append(term.clipfrac)
                        by_step["grad_norm"][k].append(step_norm * len(steps) / weight)
                    losses.append(term)
                    # a rank's unused row (weight 0) only keeps DDP in step: the count stays that of one process
                    nfe_train += len(used) * (2 if train.beta > 0 else 1) if weight > 0 else 0
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), train.grad_clip)))
                learner.optimizer.step()
                learner.optimizer.zero_grad(set_to_none=True)
    return {
        **loss_stats([t for t in losses if t.rows]),
        "grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
        "nfe_train": float(world.sum(nfe_train)),
        "trained_steps": float(sum(1 for k in range(traj.num_steps) if bool(mask[:, k].any()))),
        "zero_advantage_dropped": 0.0 if dropped is None else float(dropped.float().mean()),
        **{f"{name}_per_step": [_finite_mean(values) for values in steps] for name, steps in by_step.items()},
    }


def _finite_mean(values: list[float]) -> float | None:
    """Mean of the finite ``values`` (``None``: a step not trained, or not measured)."""
    finite = [v for v in values if math.isfinite(v)]
    return round(sum(finite) / len(finite), 6) if finite else None


def loss_stats(losses: list[StepLoss]) -> dict[str, float]:
    """Means over the step losses of an update (maximum for ``ratio_dev_max``)."""
    count = max(len(losses), 1)
    return {
        "policy_loss": sum(t.policy_loss for t in losses) / count,
        "kl": sum(t.kl for t in losses) / count,
        "approx_kl": sum(t.approx_kl for t in losses) / count,
        "clipfrac": sum(t.clipfrac for t in losses) / count,
        "ratio_dev_max": max([0.0] + [t.ratio_dev_max for t in losses]),
        "first_step_ratio_dev": losses[0].ratio_dev_max if losses else math.nan,
    }


def iteration_numbers(learner: Learner, traj: Trajectory, scores: Scores, noise_level: Tensor, advantages: Tensor,
                      update: dict[str, float], seconds: dict[str, float]) -> dict[str, Any]:
    """The metrics record of one iteration (the run adds ``iteration`` and its totals)."""
    terminal = scores.terminal
    zero_std = learner.estimator.last_stats.get("zero_std_ratio")
    return {
        "reward_mean": nanmean(terminal),
        "reward_std": nanstd(terminal),
        **dense_gain_stats(scores.dense),
        "noise_level": [round(float(v), 6) for v in noise_level],
        **{k: update[k] for k in ("approx_kl", "kl", "clipfrac", "policy_loss", "grad_norm", "first_step_ratio_dev", "ratio_dev_max")},
        "clipfrac_per_step": update["clipfrac_per_step"],
        "grad_norm_per_step": update["grad_norm_per_step"],
        "zero_std_ratio": float(zero_std if zero_std is not None else zero_std_ratio(terminal, learner.train.group_size)),
        "nan_rewards": int(torch.isnan(terminal).sum()),
        "advantage_abs_mean": float(advantages.abs().mean()),
        "zero_advantage_dropped": update["zero_advantage_dropped"],
        "untrained_zero_noise_steps": untrained_zero_noise_steps(noise_level, learner.train.timestep_fraction),
        "nfe_rollout": int(learner.world.sum(traj.num_samples * traj.num_steps)),
        "nfe_dense": scores.nfe_dense,
        "nfe_train": int(update["nfe_train"]),
        "reward_calls": scores.reward_calls,
        **{k: round(v, 4) for k, v in seconds.items()},
    }


def untrained_zero_noise_steps(noise_level: Tensor, timestep_fraction: float) -> int:
    """Steps among those ``timestep_fraction`` trains whose ``noise_level (T,)`` is 0: Euler
    steps without a log-prob, so the loss skips them."""
    trainable = noise_level[: num_trained_steps(int(noise_level.shape[0]), timestep_fraction)]
    return int((trainable == 0).sum())


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


def nanmean(values: Tensor) -> float:
    """Mean of the non-NaN entries (NaN if there are none)."""
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else math.nan


def nanstd(values: Tensor) -> float:
    """Population std of the non-NaN entries (0 for fewer than two)."""
    valid = values[~torch.isnan(values)]
    return float(valid.std(unbiased=False)) if valid.numel() > 1 else 0.0


def zero_std_ratio(terminal: Tensor, group_size: int) -> float:
    """Share of prompt groups whose terminal rewards ``(N,)`` are all equal."""
    groups = terminal.reshape(-1, group_size)
    return float((torch.nan_to_num(groups).std(dim=1, unbiased=False) < 1e-8).float().mean())
