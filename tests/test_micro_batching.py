"""Micro-batched training forward (``train.micro_batch_size``) and seeded minibatch shuffling
(``train.shuffle_minibatches``), issue 32.

Truths the checks compare against, never the chunked code itself: the closed-form loss and gradient
of the hand policy (``ShiftPolicy`` + ``LinearSampler``: every quantity is a formula of ``theta``),
the unchunked update of a tiny SD3 with classifier-free guidance in the loss, the mean over every
row of a minibatch for the simulated ranks, and one process for two.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from densegrpo.components.policies.sd3 import SD3Policy
from densegrpo.contracts import config as cfg
from densegrpo.contracts import registry
from densegrpo.contracts.config import TrainConfig
from densegrpo.contracts.protocols import Cond, Trajectory
from densegrpo.method.distributed import DataParallel, World
from densegrpo.method.grpo import (
    Learner,
    micro_batch_count,
    micro_batches,
    minibatch_order,
    minibatches,
    rank_share,
    update_policy,
    zero_advantage_rows,
)
from densegrpo.method.sigmas import make_sigmas
from densegrpo.run.batches import TRAIN_STREAM
from densegrpo.run.train import MINIBATCH_ORDER, run_training
from loop_components import LinearSampler, ShiftPolicy
from safetensors.torch import load_file

TESTS = Path(__file__).parent


class RecordingSGD(torch.optim.SGD):
    """SGD that keeps a copy of the gradients of every step it takes."""

    def __init__(self, params, lr: float):
        super().__init__(params, lr=lr)
        self.grads: list[list[torch.Tensor]] = []

    def step(self, closure=None):
        self.grads.append([p.grad.detach().clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


# ----------------------------------------------------------------------------- 1. closed form
C = [1.0, 2.0, -1.0, 0.5, -0.3]  # the hand policy's log-prob is theta * c ...
M = [0.5, 1.0, 2.0, -1.5, 0.8]  # ... and its mean theta * m (the reference's: 0)
A = [1.0, 0.0, -2.0, 0.7, -0.4]  # row 1 has zero advantage: dropped
THETA, BETA, STD_T = 0.5, 0.1, 0.5


def hand_trajectory() -> Trajectory:
    n = len(C)
    return Trajectory(
        latents=torch.tensor([C, M]).T.reshape(n, 2, 1, 1, 1), log_probs=torch.zeros(n, 1),
        means=torch.zeros(n, 1, 1, 1, 1), velocities=torch.zeros(n, 1, 1, 1, 1), sigmas=torch.tensor([1.0, 0.0]),
        noise_level=torch.tensor([0.7]), step_std=torch.tensor([0.25]), trained_steps=torch.ones(n, 1, dtype=torch.bool),
        cond=Cond(prompt_embeds=torch.zeros(n, 1, 1)), std_t=torch.tensor([STD_T]),
    )


@pytest.mark.parametrize("micro", [None, 1, 3])
def test_micro_batches_take_the_closed_form_step_over_the_kept_rows(micro):
    """One SGD step (lr 1, no clipping) on the 4 kept rows, in 1, 4 or 2 micro-batches: theta moves by the
    closed-form gradient of the mean loss, policy term -A exp(theta c) plus beta (theta m)^2 / (2 std_t^2)."""
    policy = ShiftPolicy(THETA)
    train = TrainConfig(beta=BETA, clip_range=10.0, grad_clip=1e9, timestep_fraction=1.0, micro_batch_size=micro)
    optimizer = RecordingSGD([policy.theta], lr=1.0)
    learner = Learner(policy, LinearSampler(), None, optimizer, DataParallel(World()), train, torch.tensor([1.0, 0.0]))
    advantages = torch.tensor(A).unsqueeze(1)
    update = update_policy(learner, hand_trajectory(), advantages, zero_advantage_rows(advantages))
    kept = [0, 2, 3, 4]
    grad = sum(-A[i] * C[i] * math.exp(THETA * C[i]) + BETA * THETA * M[i] ** 2 / STD_T**2 for i in kept) / len(kept)
    assert len(optimizer.grads) == 1
    assert float(policy.theta.detach()) == pytest.approx(THETA - grad, rel=1e-6)
    assert update["policy_loss"] == pytest.approx(sum(-A[i] * math.exp(THETA * C[i]) for i in kept) / 4, rel=1e-6)
    assert update["kl"] == pytest.approx(sum((THETA * M[i]) ** 2 / (2 * STD_T**2) for i in kept) / 4, rel=1e-6)
    assert update["grad_norm"] == pytest.approx(abs(grad), rel=1e-6)
    assert update["grad_norm_per_step"][0] == pytest.approx(abs(grad), rel=1e-5)  # one step: its norm is the whole one
    assert update["nfe_train"] == 4 * 2  # kept rows only, policy + reference forward, however they are cut


# ----------------------------------------------------------------------------- 2. tiny SD3 with CFG
@pytest.fixture(scope="module")
def sd3():
    """A tiny SD3 with guidance 4.5 in the loss, its initial LoRA weights and a 6-sample, 2-step rollout."""
    policy = SD3Policy.tiny_random(seed=0, guidance_scale=4.5, resolution=16)
    sampler = registry.load("samplers", "flow-sde")
    sigmas = make_sigmas(2, 3.0)
    with torch.no_grad():
        noise = torch.randn((6, *policy.latent_shape), generator=torch.Generator().manual_seed(1))
        cond = policy.encode(["a red circle", "two blue squares", "a cat"] * 2)
        traj = sampler.rollout(policy, cond, noise, sigmas, torch.full((2,), 0.7), generator=torch.Generator().manual_seed(2))
    return policy, sampler, sigmas, traj, policy.trainable_state_dict()


def sd3_update(sd3, advantages: torch.Tensor, micro: int | None) -> tuple[list[list[torch.Tensor]], dict]:
    """Two minibatches of 3 samples (2 optimizer steps) from the initial LoRA weights, SGD with the gradients kept."""
    policy, sampler, sigmas, traj, initial = sd3
    policy.load_trainable_state_dict(initial)
    train = TrainConfig(beta=0.04, clip_range=2e-4, grad_clip=1e9, timestep_fraction=1.0, minibatch_size=3,
                        group_size=3, groups_per_iteration=2, micro_batch_size=micro)
    optimizer = RecordingSGD(policy.trainable_parameters(), lr=3.0)
    learner = Learner(policy, sampler, None, optimizer, DataParallel(World()), train, sigmas)
    update = update_policy(learner, traj, advantages, zero_advantage_rows(advantages))
    return optimizer.grads, update


def assert_same_numbers(a: dict, b: dict) -> None:
    """The logged numbers to float32 tolerance: a smaller batch changes the forward's rounding, and a ratio's
    deviation from 1 (here ~6e-4) is a difference of float32 log-probs, good to a few 1e-7 absolute."""
    for key in ("policy_loss", "kl", "approx_kl", "clipfrac", "grad_norm"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    for key in ("ratio_dev_max", "first_step_ratio_dev"):
        assert a[key] == pytest.approx(b[key], rel=0, abs=1e-6), key
    for key in ("clipfrac_per_step", "grad_norm_per_step"):
        assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-9), key
    assert (a["nfe_train"], a["trained_steps"], a["zero_advantage_dropped"]) == (b["nfe_train"], b["trained_steps"], b["zero_advantage_dropped"])


@pytest.mark.parametrize("estimator, micro", [("sparse", 1), ("dense", 2)])
def test_sd3_micro_batches_accumulate_the_unchunked_gradients(sd3, estimator, micro):
    """Per optimizer step, the LoRA gradients in micro-batches equal those of one forward per minibatch.
    Row 1 is dropped (zero advantage), so minibatch 0 trains rows 0 and 2 (micro 1: two runs; micro 2: one)
    and minibatch 1 rows 3 to 5 (three runs; or 2 + 1 rows); beta > 0, and the second step clips."""
    torch.manual_seed(3)
    advantages = torch.randn(6, 1).expand(6, 2).clone() if estimator == "sparse" else torch.randn(6, 2)
    advantages[1] = 0.0
    whole, whole_numbers = sd3_update(sd3, advantages, None)
    assert len(whole) == 2  # 2 minibatches
    assert 0 < whole_numbers["clipfrac"] < 1 and whole_numbers["kl"] > 0  # both branches of the clip, and the KL, train
    grads, numbers = sd3_update(sd3, advantages, micro)
    assert len(grads) == len(whole)
    for step, (mine, theirs) in enumerate(zip(grads, whole)):
        scale = max(float(g.abs().max()) for g in theirs)
        assert scale > 0
        for g, h in zip(mine, theirs):
            assert float((g - h).abs().max()) <= 2e-5 * scale, step
    assert_same_numbers(numbers, whole_numbers)


# ----------------------------------------------------------------------------- 3. ranks and minibatches
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_rank_weights_make_every_minibatch_the_mean_over_its_rows(world_size, shuffled):
    """Simulated ranks: DDP's average over ranks of weight x (the rank's mean) is the mean over every row of
    the minibatch left in the loss, whatever the ranks' shares; micro-batches cover the rows, at most
    micro_batch_size each, as many on every rank."""
    total, per_step, micro = 24, 12, 2
    n = total // world_size
    generator = torch.Generator().manual_seed(5)
    values = torch.randn(total, generator=generator)
    kept = torch.rand(total, generator=generator) > 0.3
    order = torch.randperm(total, generator=generator) if shuffled else None
    batches = minibatches(n, world_size, per_step // world_size, order)
    assert len(batches) == 2
    seen = torch.zeros(total, dtype=torch.bool)
    for index, members in enumerate(batches):
        flat = members.reshape(-1)
        assert not (seen & flat).any()
        seen |= flat
        rows = set(order[index * per_step:(index + 1) * per_step].tolist()) if shuffled else {
            r * n + i for r in range(world_size) for i in range(index * (per_step // world_size), (index + 1) * (per_step // world_size))}
        assert set(flat.nonzero().flatten().tolist()) == rows
        in_loss = sorted(i for i in rows if kept[i])
        average = 0.0
        counts = []
        for rank in range(world_size):
            used, weight = rank_share(members, kept.reshape(world_size, n), rank)
            if weight > 0:
                average += weight * float(values[[rank * n + i for i in used]].mean()) / world_size
            runs = micro_batches(used, weight, micro_batch_count(members, kept.reshape(world_size, n), micro))
            counts.append(len(runs))
            assert all(len(run) <= micro for run, _ in runs)
            assert [i for run, trained in runs if trained for i in run] == (used if weight > 0 else [])
        assert average == pytest.approx(float(values[in_loss].mean()), rel=1e-6)
        assert len(set(counts)) == 1  # every rank runs the same forward passes (FSDP)
    assert seen.all()


def test_shares_of_a_shuffled_minibatch_differ_between_ranks_but_not_the_minibatch():
    order = torch.randperm(16, generator=torch.Generator().manual_seed(0))
    one, two = minibatches(16, 1, 8, order), minibatches(8, 2, 4, order)
    assert [m.reshape(-1).tolist() for m in one] == [m.reshape(-1).tolist() for m in two]
    assert any(int(m[0].sum()) != 4 for m in two)  # this draw gives the ranks unequal shares


def test_minibatch_order_is_seeded_by_seed_iteration_and_epoch():
    train = TrainConfig(shuffle_minibatches=True)
    first = minibatch_order(train, 64, (42, 1, 7, 2), 0)
    assert torch.equal(first, minibatch_order(train, 64, (42, 1, 7, 2), 0))  # same keys: same order, e.g. on resume
    assert sorted(first.tolist()) == list(range(64)) and first.tolist() != list(range(64))
    for keys, epoch in [((42, 1, 7, 2), 1), ((42, 1, 8, 2), 0), ((43, 1, 7, 2), 0)]:
        assert not torch.equal(first, minibatch_order(train, 64, keys, epoch))
    assert minibatch_order(TrainConfig(), 64, (42, 1, 7, 2), 0) is None  # off by default: rows in order
    with pytest.raises(ValueError, match="order_keys"):
        minibatch_order(train, 64, (), 0)


# ----------------------------------------------------------------------------- 4. runs
ANALYTIC = [
    "policy.name=loop_components:AnalyticPolicy",
    "rewards.0.name=loop_components:BrightnessReward",
    "advantage.name=dense",
    "calibrator.name=uniform",
    "sampling.num_steps=3",
    "train.group_size=4",
    "train.groups_per_iteration=2",
    "train.minibatch_size=4",
    "train.learning_rate=0.05",
    "train.clip_range=0.2",
    "logging.progress=false",
    "logging.sample_prompts=0",
    "logging.eval_prompts=0",
    "checkpoint_every=1",
]


def _weights(run: Path, iteration: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"iter-{iteration:06d}" / "trainable.safetensors")


def _train(run: Path, *extra: str, resume: bool = False) -> None:
    run_training(cfg.resolve(None, [*ANALYTIC, *extra]), run, resume=resume)


def test_shuffled_minibatches_change_the_run_and_resume_exactly(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    shuffled = ["train.shuffle_minibatches=true", "train.micro_batch_size=1", "train.inner_epochs=2"]
    _train(tmp_path / "plain", "iterations=2", "train.inner_epochs=2")
    _train(tmp_path / "straight", "iterations=2", *shuffled)
    _train(tmp_path / "resumed", "iterations=1", *shuffled)
    _train(tmp_path / "resumed", "iterations=2", *shuffled, resume=True)
    straight, resumed, plain = (_weights(tmp_path / name, 2) for name in ("straight", "resumed", "plain"))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)  # the order depends on seed, iteration, epoch only
    assert max(float((straight[k] - plain[k]).abs().max()) for k in straight) > 1e-4  # other minibatches, other steps


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


@pytest.mark.slow
def test_two_processes_take_the_shuffled_micro_batched_steps_of_one(tmp_path):
    """A group of 8 spanning both ranks, minibatches of 4 in a shuffled order (unequal shares per rank,
    padded to the same micro-batch count) and micro-batches of 1: the same weights as one process."""
    items = [*ANALYTIC, "seed=0", "advantage.name=sparse", "train.group_size=8", "train.groups_per_iteration=1", "iterations=2",
             "train.shuffle_minibatches=true", "train.micro_batch_size=1"]
    sets = [a for item in items for a in ("--set", item)]
    shuffle = TrainConfig(shuffle_minibatches=True)
    shares = [[m.sum(dim=1).tolist() for m in minibatches(4, 2, 2, minibatch_order(shuffle, 8, (0, TRAIN_STREAM, i, MINIBATCH_ORDER), 0))]
              for i in range(2)]
    assert shares == [[[2, 2], [2, 2]], [[1, 3], [3, 1]]]  # seed 0: iteration 1 gives the ranks unequal shares
    launchers = {1: [sys.executable, "-m", "densegrpo", "train"],
                 2: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "densegrpo", "train"]}
    for nproc, launcher in launchers.items():
        done = subprocess.run([*launcher, *sets, "--out", str(tmp_path / str(nproc))], env=_env(), capture_output=True, text=True, timeout=600, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
    state = json.loads((tmp_path / "2" / "checkpoints" / "iter-000002" / "state.json").read_text())
    assert state["world_size"] == 2
    one, two = _weights(tmp_path / "1", 2), _weights(tmp_path / "2", 2)
    for key in one:
        assert torch.allclose(one[key], two[key], atol=1e-6, rtol=0), (key, float((one[key] - two[key]).abs().max()))
    rows = [[json.loads(line)["nfe_train"] for line in (tmp_path / str(k) / "metrics.jsonl").read_text().splitlines()] for k in (1, 2)]
    assert rows[0] == rows[1]
