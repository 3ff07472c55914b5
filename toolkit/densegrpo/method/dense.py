"""The dense-reward engine: ``R_t = R(ODE_n(x_t))`` for every state of a batch of
trajectories (DenseGRPO; method.md section 3).

Each state ``x_k = traj.latents[:, k]`` (``t = T - k`` steps left) is completed to a clean
estimate by ``n`` deterministic Euler steps, decoded, and scored once.

Completion ``n`` (``completion``):

* ``"t"`` (default, the paper): all remaining steps of the same grid, so the completion of
  ``x_0`` is the pure-ODE sample from the same noise and ``R_0`` is the terminal reward.
* an integer ``k``: ``min(k, t)`` steps.
* ``"t/C"``: ``ceil(t / C)`` steps (e.g. ``"t/2"``).

With ``n < t`` the Euler steps run over a sub-grid of the remaining grid
``sigmas[k:]`` (``t + 1`` points): the indices ``k + floor(i * t / n + 1/2)`` for
``i = 0 .. n``, i.e. ``n + 1`` points picked evenly along the remaining grid *by index*,
rounded half up. They start at ``sigma_k``, always end at ``sigma = 0``, and are distinct
because ``t / n >= 1``. ``n = 1`` is the one-step estimate ``x_t - sigma_t v``.

Modes (both give the same rewards, to float rounding):

* ``"batched"``: the first completion step reuses ``traj.velocities[:, k]`` (the rollout
  already evaluated ``v(x_k, sigma_k)``), and every completion that sits at the same grid
  sigma advances in one model call (rows of several starting steps concatenated, split into
  near-equal chunks of at most ``max_batch_size``; the loop sets it to ``sampling.chunk_size``).
  For ``n = t`` this costs
  ``N * T (T - 1) / 2`` velocity evaluations in ``T - 1`` batched rounds.
* ``"naive"``: the straightforward reference: for each start ``k`` separately, complete all
  ``N`` samples with ``n`` fresh velocity evaluations at batch ``N`` (``N * T (T + 1) / 2``
  for ``n = t``).

States (``states``): by default every state ``x_0 .. x_T`` is completed and scored. Given
a set of step indices, only those states (and always the final sample ``x_T``, the
terminal reward) are; the others get reward NaN ("not computed") and cost nothing. The loop
uses this when only the first steps are trained: the gain of step ``k`` reads only the
states ``x_k`` and ``x_{k+1}``, so the completions of later states would be wasted.

The reused velocities must come from the same weights as the engine's ``policy`` (compute
dense rewards right after the rollout, before any update).

Memory. Every model call and every decode takes at most ``max_batch_size`` rows. A call's
conditioning is gathered from the trajectory's shared ``traj.cond`` for that call only and
dropped after it, never cached per chunk: SD3.5-M's embeddings (333 tokens x 4096 in
bfloat16) are 2.7 MB a row, as much again for the negative's, and a copy cached per distinct
chunk grew with the batch (at 144 samples per rank, T = 10 and 256-row chunks: 18 chunks,
4032 rows, 22 GB). Decoded chunks gather their clean estimates by index, without a flat copy
of all of them.
"""

from __future__ import annotations

import math
import re
from typing import Callable, Collection, Literal

import torch
from torch import Tensor

from densegrpo.contracts.protocols import Cond, DenseRewards, Policy, Trajectory

Completion = int | str
ScoreFn = Callable[[Tensor, Tensor], Tensor]
"""``score(images (M,3,H,W) float32 in [0,1], rows (M,) long) -> rewards (M,)`` (or ``(M, R)``
for ``R`` rewards, giving dense rewards ``(N, T+1, R)``); ``rows[j]`` is the trajectory sample
image ``j`` belongs to (bind prompts and metadata with it)."""

_FRACTION = re.compile(r"^\s*t\s*/\s*(\d+)\s*$")


def completion_steps(remaining: int, completion: Completion) -> int:
    """``n``, the Euler steps that complete a state with ``remaining = t`` steps left."""
    if remaining < 0:
        raise ValueError(f"remaining steps must be >= 0, got {remaining}.")
    kind, value = _parse_completion(completion)
    if kind == "all":
        return remaining
    if kind == "fixed":
        return min(value, remaining)
    return math.ceil(remaining / value)


def _parse_completion(completion: Completion) -> tuple[str, int]:
    if isinstance(completion, bool):
        pass  # bool is an int subclass; never a step count
    elif isinstance(completion, int):
        if completion >= 1:
            return "fixed", completion
    elif isinstance(completion, str):
        text = completion.strip()
        if text == "t":
            return "all", 0
        if text.isdigit() and int(text) >= 1:
            return "fixed", int(text)
        match = _FRACTION.match(text)
        if match and int(match.group(1)) >= 1:
            return "fraction", int(match.group(1))
    raise ValueError(
        f"completion must be 't' (all remaining steps), a positive integer k, or 't/C' with a "
        f"positive integer C (e.g. 't/2'); got {completion!r}."
    )


def completion_grid(start: int, num_steps: int, completion: Completion) -> list[int]:
    """Grid indices ``[start, ..., num_steps]`` visited when completing ``x_start``
    (``n + 1`` indices; a single ``[num_steps]`` for the clean sample itself)."""
    remaining = num_steps - start
    n = completion_steps(remaining, completion)
    if n == 0:
        return [num_steps]
    # start + floor(i * t / n + 1/2), in exact integer arithmetic
    return [start + (2 * i * remaining + n) // (2 * n) for i in range(n + 1)]


def required_nfe(num_steps: int, num_samples: int, completion: Completion = "t",
                 mode: Literal["batched", "naive"] = "batched", states: Collection[int] | None = None) -> int:
    """Velocity evaluations the engine spends on completions (the rollout's ``N * T`` not
    included). ``n = t``, every state: ``N T (T - 1) / 2`` batched, ``N T (T + 1) / 2`` naive."""
    _check_mode(mode)
    reuse = 1 if mode == "batched" else 0
    per_sample = sum(
        max(completion_steps(num_steps - k, completion) - reuse, 0) for k in completed_states(num_steps, states)
    )
    return num_samples * per_sample


def completed_states(num_steps: int, states: Collection[int] | None) -> list[int]:
    """Sorted step indices ``k < T`` whose states are completed (``None``: all of them)."""
    if states is None:
        return list(range(num_steps))
    chosen = sorted({int(k) for k in states})
    if chosen and (chosen[0] < 0 or chosen[-1] > num_steps):
        raise ValueError(f"states must be step indices in [0, {num_steps}], got {chosen}.")
    return [k for k in chosen if k < num_steps]


DEFAULT_MAX_BATCH_SIZE = 256
"""Rows per model call and per decode when ``sampling.chunk_size`` is unset (what the engine always used)."""


def _check_mode(mode: str) -> None:
    if mode not in ("batched", "naive"):
        raise ValueError(f"mode must be 'batched' or 'naive', got {mode!r}.")


class DenseRewardEngine:
    """Computes ``R_t = R(ODE_n(x_t))`` for ``t = T .. 0`` (see the module docstring).

    Args:
        completion: ``"t"``, an integer ``k`` or ``"t/C"`` (DenseGRPO uses ``"t"``).
        mode: ``"batched"`` (velocity reuse + batched rounds) or ``"naive"`` (reference).
        max_batch_size: most rows per model call and per decode/score call.
    """

    def __init__(self, completion: Completion = "t", mode: Literal["batched", "naive"] = "batched",
                 max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> None:
        _parse_completion(completion)
        _check_mode(mode)
        if int(max_batch_size) != max_batch_size or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive integer, got {max_batch_size!r}.")
        self.completion = completion
        self.mode = mode
        self.max_batch_size = int(max_batch_size)

    # -- completions -------------------------------------------------------------------
    def clean_estimates(self, policy: Policy, traj: Trajectory,
                        states: Collection[int] | None = None) -> tuple[Tensor, int]:
        """``(estimates (N, T+1, C, h, w) float32, nfe)`` in step-index order:
        ``estimates[:, k] = ODE_n(latents[:, k])``; ``estimates[:, T]`` is the final sample.
        With ``states``, the other entries are NaN and not computed."""
        starts = completed_states(traj.num_steps, states)
        with torch.no_grad():
            if self.mode == "batched":
                estimates, nfe = self._batched(policy, traj, starts)
            else:
                estimates, nfe = self._naive(policy, traj, starts)
        estimates[:, -1] = traj.latents[:, -1].to(torch.float32)
        return estimates, nfe

    def _velocity(self, policy: Policy, x: Tensor, sigma: Tensor, rows: Tensor, cond: Cond) -> Tensor:
        """``v(x (M,C,h,w), sigma)`` for trajectory rows ``rows (M,)`` (CPU long) of ``cond``, in
        near-equal chunks of at most ``max_batch_size`` rows. Each chunk's conditioning is gathered
        from ``cond`` for its call and released before the next one (see the module docstring)."""
        outputs = []
        num_chunks = math.ceil(x.shape[0] / self.max_batch_size)
        for x_chunk, row_chunk in zip(x.tensor_split(num_chunks), rows.tensor_split(num_chunks)):
            sigma_rows = sigma.to(torch.float32).expand(x_chunk.shape[0]).contiguous()
            outputs.append(policy.velocity(x_chunk, sigma_rows, _rows_of(cond, row_chunk)).to(torch.float32))
        return torch.cat(outputs)

    def _batched(self, policy: Policy, traj: Trajectory, starts: list[int]) -> tuple[Tensor, int]:
        num_samples, num_steps = traj.num_samples, traj.num_steps
        sigmas = traj.sigmas.to(torch.float32)
        latents = traj.latents.to(torch.float32)
        sample_rows = torch.arange(num_samples)
        grids = {k: completion_grid(k, num_steps, self.completion) for k in starts}
        position = {k: 0 for k in starts}  # index into grids[k] of the current sigma
        state = {k: latents[:, k] for k in starts}
        estimates = torch.full_like(latents, math.nan)
        nfe = 0
        for j in range(num_steps):  # completions only move forward: bucket by grid index j
            waiting = [k for k in starts if k < j and position[k] < len(grids[k]) - 1 and grids[k][position[k]] == j]
            # reuse the rollout's v(x_j) for the completion that starts at x_j
            velocity = {j: traj.velocities[:, j].to(torch.float32)} if j in grids else {}
            if waiting:
                x = torch.cat([state[k] for k in waiting])
                rows = sample_rows.repeat(len(waiting))
                v = self._velocity(policy, x, sigmas[j], rows, traj.cond)
                nfe += int(x.shape[0])
                velocity.update(zip(waiting, v.split(num_samples)))
            for k, v_k in velocity.items():
                target = grids[k][position[k] + 1]
                state[k] = state[k] + v_k * (sigmas[target] - sigmas[j])  # Euler step
                position[k] += 1
                if target == num_steps:
                    estimates[:, k] = state.pop(k)
        return estimates, nfe

    def _naive(self, policy: Policy, traj: Trajectory, starts: list[int]) -> tuple[Tensor, int]:
        num_samples, num_steps = traj.num_samples, traj.num_steps
        sigmas = traj.sigmas.to(torch.float32)
        latents = traj.latents.to(torch.float32)
        rows = torch.arange(num_samples)
        estimates = torch.full_like(latents, math.nan)
        nfe = 0
        for k in starts:
            grid = completion_grid(k, num_steps, self.completion)
            x = latents[:, k]
            for here, there in zip(grid[:-1], grid[1:]):
                v = self._velocity(policy, x, sigmas[here], rows, traj.cond)
                nfe += num_samples
                x = x + v * (sigmas[there] - sigmas[here])
            estimates[:, k] = x
        return estimates, nfe

    # -- rewards -----------------------------------------------------------------------
    def __call__(self, policy: Policy, traj: Trajectory, score: ScoreFn,
                 states: Collection[int] | None = None) -> DenseRewards:
        """Dense rewards ``(N, T+1)`` float32 in the papers' order (``rewards[:, 0] = R_0``,
        the terminal reward), on the latents' device, with the completion NFE and the number
        of images scored. Images are decoded with ``policy.decode`` and scored in chunks of
        ``max_batch_size``, each clean estimate exactly once. With ``states`` (step indices
        ``k``), only those states and the final sample are scored; the rest are NaN."""
        estimates, nfe = self.clean_estimates(policy, traj, states)
        num_samples, num_states = estimates.shape[:2]
        scored_states = completed_states(traj.num_steps, states) + [traj.num_steps]
        # image j is the estimate of state columns[j] of sample rows[j] (sample-major, as the scores reshape)
        rows = torch.arange(num_samples).repeat_interleave(len(scored_states))
        columns = torch.tensor(scored_states).repeat(num_samples)
        scores = []
        with torch.no_grad():
            for start in range(0, rows.numel(), self.max_batch_size):
                chunk_rows = rows[start:start + self.max_batch_size]
                chunk_columns = columns[start:start + self.max_batch_size]
                # gathered per chunk: a flat copy of every estimate would be (N (T+1), C, h, w)
                latents = estimates[chunk_rows.to(estimates.device), chunk_columns.to(estimates.device)]
                images = policy.decode(latents)
                value = torch.as_tensor(score(images, chunk_rows))
                if value.ndim not in (1, 2) or value.shape[0] != chunk_rows.numel():
                    raise ValueError(
                        f"score returned shape {tuple(value.shape)} for {chunk_rows.numel()} images; "
                        "it must return one reward per image, shape (M,) (or (M, R) for R rewards)."
                    )
                scores.append(value.detach().to(estimates.device, torch.float32))
        stacked = torch.cat(scores)
        values = stacked.reshape(num_samples, len(scored_states), *stacked.shape[1:])
        by_step_index = torch.full((num_samples, num_states, *values.shape[2:]), math.nan,
                                   dtype=torch.float32, device=values.device)
        by_step_index[:, scored_states] = values
        return DenseRewards(rewards=by_step_index.flip(1), nfe=nfe, reward_calls=int(rows.numel()))


def _rows_of(cond: Cond, rows: Tensor) -> Cond:
    """``cond``'s rows ``rows (M,)``: ``cond`` itself when they are all of its rows in order (no
    copy), else a gathered copy the caller holds for one model call."""
    if rows.numel() == len(cond) and torch.equal(rows, torch.arange(len(cond))):
        return cond
    return cond.select(rows)


__all__ = [
    "Completion",
    "DEFAULT_MAX_BATCH_SIZE",
    "DenseRewardEngine",
    "ScoreFn",
    "completion_grid",
    "completed_states",
    "completion_steps",
    "required_nfe",
]
