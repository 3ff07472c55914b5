"""Micro-benchmarks of one iteration's parts, and the time floors they imply for sparse and dense."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor

from densegrpo.contracts import config as cfg
from densegrpo.method.dense import DenseRewardEngine
from densegrpo.method.noise import draw_noise
from densegrpo.method.reward_scorer import RewardScorer
from densegrpo.method.sigmas import make_sigmas
from densegrpo.run.build import build
from densegrpo.run.evaluate import load_prompt_records

COST_ARM = "flow-grpo"  # costs are measured on the sparse baseline's components; the dense engine is built here in both modes


def timed(fn: Callable[[], Any], repeat: int = 5) -> float:
    """Median seconds of ``repeat`` calls of ``fn``, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


@dataclass
class CostInputs:
    """One batch of ``N`` samples and ``T`` steps, ready for every measurement."""

    parts: Any  # densegrpo.run.build.Components of the run config
    scorer: RewardScorer
    cond: Any  # the policy's conditioning of the N prompts
    noise: Tensor  # (N, C, h, w) initial noise on the policy's device
    step_noise: Tensor  # (N, T, C, h, w)
    sigmas: Tensor  # (T+1,)
    noise_level: Tensor  # (T,) the calibrator's psi

    @property
    def batch(self) -> int:
        return int(self.noise.shape[0])

    @property
    def num_steps(self) -> int:
        return int(self.sigmas.shape[0]) - 1


def cost_inputs(config: cfg.RunConfig) -> CostInputs:
    """Build ``config``'s components and one batch of its training prompts (repeated to fill
    ``group_size x groups_per_iteration`` samples)."""
    parts = build(config)
    count = config.train.group_size * config.train.groups_per_iteration
    records = load_prompt_records(config.prompts.train)[:count]
    records = (records * ((count // max(len(records), 1)) + 1))[:count]
    prompts = [r["prompt"] for r in records]
    scorer = RewardScorer(parts.rewards, prompts, list(records))
    num_steps = config.sampling.num_steps
    sigmas = make_sigmas(num_steps, config.sampling.shift)
    noise, step_noise = draw_noise(0, 0, list(range(count)), tuple(parts.policy.latent_shape), num_steps)
    cond = parts.policy.encode(prompts)
    noise_level = parts.calibrator.noise_level(sigmas)
    return CostInputs(parts, scorer, cond, noise.to(parts.policy.device), step_noise, sigmas, noise_level)


def step_costs(inputs: CostInputs) -> dict[str, float]:
    """Seconds of one policy forward and forward+backward on the batch, one reward call on
    its ``N`` images, and one SDE rollout of ``T`` steps."""
    policy = inputs.parts.policy
    x = inputs.noise
    sigma = torch.full((inputs.batch,), 0.5)  # any sigma: a forward's cost does not depend on it
    with torch.no_grad():
        forward = timed(lambda: policy.velocity(x, sigma, inputs.cond))
        images = policy.decode(x)
        reward_call = timed(lambda: inputs.scorer.weighted(images, torch.arange(inputs.batch)))

    def forward_backward() -> None:
        out = policy.velocity(x, sigma, inputs.cond)
        out.float().pow(2).mean().backward()
        for p in policy.trainable_parameters():
            p.grad = None

    backward = timed(forward_backward)
    with torch.no_grad():
        rollout = timed(lambda: rollout_once(inputs), repeat=3)
        fixed = FixedVelocity(policy.velocity(x, sigma, inputs.cond), policy.device)
        sampler_maths = timed(lambda: rollout_once(inputs, fixed), repeat=3)
    return {"forward_s": forward, "forward_backward_s": backward, "reward_call_s": reward_call, "rollout_s": rollout,
            "sampler_maths_s": sampler_maths}


class FixedVelocity:
    """A stand-in policy whose velocity is one precomputed ``(N, C, h, w)`` tensor: a rollout
    through it costs the sampler's own maths (means, noise, log-probs) and nothing else."""

    def __init__(self, velocity: Tensor, device: torch.device):
        self.fixed, self.device = velocity, device

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        return self.fixed


def rollout_once(inputs: CostInputs, policy: Any = None) -> Any:
    """One SDE trajectory of the batch with the calibrator's noise levels (through ``policy``,
    by default the run's)."""
    return inputs.parts.sampler.rollout(
        policy or inputs.parts.policy, inputs.cond, inputs.noise, inputs.sigmas, inputs.noise_level, step_noise=inputs.step_noise
    )


def engine_costs(inputs: CostInputs) -> dict[str, float]:
    """Seconds and NFE of the dense reward engine (``n = t``) on one trajectory, batched with
    velocity reuse against the naive reference."""
    policy, score = inputs.parts.policy, inputs.scorer.weighted
    with torch.no_grad():
        traj = rollout_once(inputs)
        batched_engine = DenseRewardEngine(completion="t", mode="batched")
        naive_engine = DenseRewardEngine(completion="t", mode="naive")
        batched = timed(lambda: batched_engine(policy, traj, score), repeat=3)
        naive = timed(lambda: naive_engine(policy, traj, score), repeat=3)
        nfe_batched = batched_engine(policy, traj, score).nfe
        nfe_naive = naive_engine(policy, traj, score).nfe
    return {"engine_batched_s": batched, "engine_naive_s": naive, "engine_nfe_batched": nfe_batched, "engine_nfe_naive": nfe_naive}


def measure_costs(config: cfg.RunConfig) -> dict[str, Any]:
    """Forward/backward/reward costs of ``config``'s policy and reward, the dense engine
    (batched vs naive), and the time floors per iteration they imply for sparse and dense."""
    inputs = cost_inputs(config)
    steps, engine = step_costs(inputs), engine_costs(inputs)
    batch, num_steps = inputs.batch, inputs.num_steps
    forward, reward_call, rollout = steps["forward_s"], steps["reward_call_s"], steps["rollout_s"]
    trained = max(1, int(num_steps * config.train.timestep_fraction))
    train_cost = trained * (steps["forward_backward_s"] + forward)  # policy forward+backward and reference forward per trained step
    floor_sparse = num_steps * forward + reward_call + train_cost
    # The dense engine's velocity calls priced at a batch-N call's cost per sample. The engine
    # batches more than N samples per call, so it can beat this estimate (a ratio below 1).
    engine_floor = engine["engine_nfe_batched"] * forward / batch + (num_steps + 1) * reward_call
    floor_dense = num_steps * forward + engine_floor + train_cost
    return {
        "batch": batch,
        "num_steps": num_steps,
        **steps,
        "sampler_maths_share": steps["sampler_maths_s"] / rollout,
        "engine_batched_s": engine["engine_batched_s"],
        "engine_naive_s": engine["engine_naive_s"],
        "engine_speedup": engine["engine_naive_s"] / engine["engine_batched_s"],
        "engine_nfe_batched": engine["engine_nfe_batched"],
        "engine_nfe_naive": engine["engine_nfe_naive"],
        "engine_estimate_s": engine_floor,
        "engine_over_estimate": engine["engine_batched_s"] / engine_floor,
        "floor_sparse_s": floor_sparse,
        "floor_dense_s": floor_dense,
        "floor_ratio": floor_dense / floor_sparse,
    }
