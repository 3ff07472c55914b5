"""``sampling.chunk_size``: the rollout, the reward scoring and the dense-reward engine in chunks.

The truth is the unchunked computation: rows are independent given their noise and step noise,
so every chunked result must equal it (exactly for the elementwise analytic policy, to float
rounding for a tiny SD3 transformer with classifier-free guidance, whose matmuls round by batch).
A wrapping policy counts the rows of every model call and decode (at most ``chunk_size``) and
the conditioning copies alive at each call (the dense engine keeps none from earlier chunks).
"""

from __future__ import annotations

import weakref
from pathlib import Path

import pytest
import torch
from densegrpo.contracts import registry
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Cond, Trajectory
from densegrpo.contracts.testing import GaussianFlowPolicy
from densegrpo.method.batch import Batch
from densegrpo.method.dense import DenseRewardEngine
from densegrpo.method.distributed import World
from densegrpo.method.grpo import rollout
from densegrpo.method.reward_scorer import RewardScorer, WeightedReward
from densegrpo.method.rewarding import ScoringPlan, score
from densegrpo.method.sigmas import make_sigmas

PROMPTS = ["a red circle", "a red circle", "two blue squares", "two blue squares", "a cat"]
T = 3
N = len(PROMPTS)


class RowCounter:
    """Wraps a policy; records the rows of every ``velocity`` and ``decode`` call and, at each
    ``velocity`` call, how many conditioning copies passed to earlier calls are still alive
    (weak references, so counting keeps none alive) and their bytes."""

    def __init__(self, policy, shared: Cond | None = None) -> None:
        self.policy = policy
        self.shared = shared  # the trajectory's own cond: not a copy
        self.velocity_rows: list[int] = []
        self.decode_rows: list[int] = []
        self.seen: list[weakref.ref] = []
        self.alive: list[int] = []
        self.alive_bytes: list[int] = []

    def velocity(self, x, sigma, cond):
        alive = [t for t in (ref() for ref in self.seen) if t is not None]
        self.alive.append(len(alive))
        self.alive_bytes.append(sum(t.numel() * t.element_size() for t in alive))
        if self.shared is None or cond.prompt_embeds is not self.shared.prompt_embeds:
            self.seen.append(weakref.ref(cond.prompt_embeds))
        self.velocity_rows.append(int(x.shape[0]))
        return self.policy.velocity(x, sigma, cond)

    def decode(self, x0):
        self.decode_rows.append(int(x0.shape[0]))
        return self.policy.decode(x0)

    def __getattr__(self, name):
        return getattr(self.__dict__["policy"], name)


def brightness(images, prompts, metadata):
    return images.float().flatten(1).mean(dim=1)


def prompt_channel(images, prompts, metadata):
    """Reads the channel the prompt names: a chunk that binds an image to another sample's prompt changes it."""
    return torch.stack([image[len(prompt) % 3].mean() for image, prompt in zip(images.float(), prompts)])


def scorer() -> RewardScorer:
    rewards = [WeightedReward("brightness", 1.0, brightness), WeightedReward("prompt-channel", 0.5, prompt_channel)]
    return RewardScorer(rewards, PROMPTS, [None] * N)


def make_batch(policy, seed: int = 0) -> Batch:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((N, *policy.latent_shape), generator=generator)
    step_noise = torch.randn((N, T, *policy.latent_shape), generator=generator)
    return Batch(list(PROMPTS), [None] * N, noise, step_noise, N)


@pytest.fixture(scope="module")
def sd3():
    from densegrpo.components.policies.sd3 import SD3Policy

    policy = SD3Policy.tiny_random(seed=0, guidance_scale=4.5, resolution=16)
    assert policy.encode(PROMPTS[:1]).negative is not None  # CFG on: two transformer rows per sample
    return policy


def analytic():
    return GaussianFlowPolicy(0.7, 0.4, (3, 4, 4), prompt_shifts={"a red circle": 0.5, "a cat": -0.3})


def assert_same_trajectory(chunked: Trajectory, whole: Trajectory, atol: float) -> None:
    for name in Trajectory.PER_SAMPLE + ("sigmas", "noise_level", "step_std", "std_t"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), atol=atol, rtol=0, msg=name)
    assert chunked.cond.prompts == whole.cond.prompts


@pytest.mark.parametrize("name", ["ode", "flow-sde", "cps", "sde-window", "coarse-sde", "dance-sde"])
def test_every_sampler_rolls_out_in_chunks_without_touching_the_generator(name) -> None:
    # the analytic velocity is elementwise, so chunks must give exactly the same floats
    policy = analytic()
    config = {"block": 2} if name == "coarse-sde" else None
    batch, sigmas, level = make_batch(policy), make_sigmas(T), torch.full((T,), 0.6)
    whole = rollout(policy, registry.load("samplers", name, config), batch, sigmas, level, torch.Generator().manual_seed(11))
    generator = torch.Generator().manual_seed(11)
    state = generator.get_state()
    counter = RowCounter(policy)
    chunked = rollout(counter, registry.load("samplers", name, config), batch, sigmas, level, generator, chunk_size=2)
    assert_same_trajectory(chunked, whole, atol=0.0)
    assert counter.velocity_rows == [2] * T + [2] * T + [1] * T  # chunk by chunk, T steps each
    # step noise comes from the batch: a sampler drawing from the generator would give each chunk other noise
    assert torch.equal(generator.get_state(), state)


def test_chunked_rollout_equals_unchunked_on_tiny_sd3_with_cfg(sd3) -> None:
    batch, sigmas, level = make_batch(sd3), make_sigmas(T), torch.full((T,), 0.7)
    sampler = registry.load("samplers", "flow-sde")
    whole = rollout(sd3, sampler, batch, sigmas, level)
    counter = RowCounter(sd3)
    chunked = rollout(counter, sampler, batch, sigmas, level, chunk_size=2)
    assert counter.velocity_rows == [2] * T + [2] * T + [1] * T
    assert_same_trajectory(chunked, whole, atol=1e-5)
    assert chunked.cond is not None and len(chunked.cond) == N
    # the tolerance can tell samples apart: a row routed to another sample's place would fail it
    assert (whole.latents[3] - whole.latents[2]).abs().max() > 0.1


@pytest.mark.parametrize("completion", ["t", 1, "t/2"])
def test_chunked_dense_rewards_equal_unchunked(sd3, completion) -> None:
    traj = rollout(sd3, registry.load("samplers", "flow-sde"), make_batch(sd3), make_sigmas(T), torch.full((T,), 0.7))
    plan = ScoringPlan(dense=True, completion=completion)
    whole = score(sd3, traj, scorer(), plan, World(), 1, 1.0)
    counter = RowCounter(sd3)
    chunked = score(counter, traj, scorer(), plan, World(), 1, 1.0, chunk_size=3)
    assert all(rows <= 3 for rows in counter.velocity_rows + counter.decode_rows)
    # every completion row was evaluated (n = 1 reuses the rollout's velocity: no call), every image decoded
    assert sum(counter.velocity_rows) == chunked.nfe_calibration and sum(counter.decode_rows) == N * (T + 1)
    # R_t of every state, for every reward, and the costs, as computed all at once
    assert chunked.dense.rewards.shape == (N, T + 1)
    assert not torch.isnan(chunked.dense.rewards).any()
    torch.testing.assert_close(chunked.dense.rewards, whole.dense.rewards, atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.terminal, whole.terminal, atol=1e-5, rtol=0)
    assert (chunked.nfe_calibration, chunked.reward_calls) == (whole.nfe_calibration, whole.reward_calls)


def test_chunked_dense_rewards_of_some_states(sd3) -> None:
    # step-local scoring: only the trained steps' states (and x_T); the others stay NaN in both
    traj = rollout(sd3, registry.load("samplers", "flow-sde"), make_batch(sd3), make_sigmas(T), torch.full((T,), 0.7))
    plan = ScoringPlan(dense=True, completion="t", step_local=True, estimator_dense=True)
    whole = score(sd3, traj, scorer(), plan, World(), 1, 0.5)
    chunked = score(sd3, traj, scorer(), plan, World(), 1, 0.5, chunk_size=2)
    assert torch.equal(torch.isnan(chunked.dense.rewards), torch.isnan(whole.dense.rewards))
    assert torch.isnan(whole.dense.rewards).any()
    torch.testing.assert_close(chunked.dense.rewards, whole.dense.rewards, atol=1e-5, rtol=0, equal_nan=True)
    torch.testing.assert_close(chunked.for_estimator.dense, whole.for_estimator.dense, atol=1e-5, rtol=0, equal_nan=True)


def test_chunked_sparse_scores_equal_unchunked(sd3) -> None:
    traj = rollout(sd3, registry.load("samplers", "flow-sde"), make_batch(sd3), make_sigmas(T), torch.full((T,), 0.7))
    plan = ScoringPlan(dense=False)
    counter = RowCounter(sd3)
    whole = score(counter, traj, scorer(), plan, World(), 1, 1.0)
    assert counter.decode_rows == [N]  # unset: one decode, as before
    counter = RowCounter(sd3)
    chunked = score(counter, traj, scorer(), plan, World(), 1, 1.0, chunk_size=2)
    assert counter.decode_rows == [2, 2, 1] and not counter.velocity_rows
    torch.testing.assert_close(chunked.terminal, whole.terminal, atol=1e-6, rtol=0)
    assert chunked.reward_calls == whole.reward_calls == N
    # the truth, image by image
    truth = torch.stack([scorer().weighted(sd3.decode(traj.final[i:i + 1]), torch.tensor([i]))[0] for i in range(N)])
    torch.testing.assert_close(chunked.terminal, truth, atol=1e-6, rtol=0)


def test_dense_engine_keeps_no_copies_of_earlier_chunks_embeddings(sd3) -> None:
    traj = rollout(sd3, registry.load("samplers", "flow-sde"), make_batch(sd3), make_sigmas(T), torch.full((T,), 0.7))
    for chunk in (3, 2):  # 6 then 8 model calls, each on a gathered copy of its rows' embeddings
        counter = RowCounter(sd3, shared=traj.cond)
        DenseRewardEngine("t", max_batch_size=chunk)(counter, traj, lambda images, rows: images.mean(dim=(1, 2, 3)))
        assert len(counter.seen) == len(counter.velocity_rows) > 1
        # at every call, no copy made for an earlier call is alive: memory flat in the number of chunks
        assert max(counter.alive) == 0 and max(counter.alive_bytes) == 0


def test_concat_checks_its_parts() -> None:
    policy = analytic()
    sampler = registry.load("samplers", "flow-sde")
    batch, sigmas = make_batch(policy), make_sigmas(T)
    cond = policy.encode(batch.prompts)

    def part(rows: range, level: float) -> Trajectory:
        return sampler.rollout(policy, cond.select(rows), batch.noise[rows.start:rows.stop], sigmas,
                               torch.full((T,), level), step_noise=batch.step_noise[rows.start:rows.stop])

    whole = Trajectory.concat([part(range(0, 4), 0.7), part(range(4, N), 0.7)], cond)
    assert whole.cond is cond and whole.num_samples == N
    with pytest.raises(UserError, match="noise_level, step_std, std_t.*sampling.chunk_size: null"):
        Trajectory.concat([part(range(0, 4), 0.7), part(range(4, N), 0.5)], cond)
    with pytest.raises(ValueError, match="hold 4 rows but cond has 5"):
        Trajectory.concat([part(range(0, 4), 0.7)], cond)


def test_a_run_chunks_its_calibration_rollouts_and_scoring_and_trains_the_same(tmp_path, monkeypatch) -> None:
    # the run's wiring: sampling.chunk_size reaches the calibration rounds, the rollout and the
    # dense scoring; with the elementwise analytic policy every number must come out bit-identical
    from densegrpo.contracts import config as cfg
    from densegrpo.run.hooks.calibration import calibrate
    from densegrpo.run.state import Run
    from densegrpo.run.train import train_step

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    sets = [
        "policy.name=loop_components:AnalyticPolicy", "rewards.0.name=loop_components:BrightnessReward",
        "sampling.num_steps=4", "train.group_size=4", "train.groups_per_iteration=2", "advantage.name=dense",
        "logging.progress=false", "calibrator.config.max_rounds=1", "calibrator.config.samples_per_round=8",
        "train.beta=0",  # no KL reference pass: the loss's forward passes are train.micro_batch_size's, not counted here
    ]
    outcomes = {}
    for chunk in (None, 3):
        run = Run(cfg.resolve(None, sets + ([f"sampling.chunk_size={chunk}"] if chunk else [])), tmp_path / str(chunk))
        rows: list[int] = []
        velocity, decode = run.policy.velocity, run.policy.decode

        def counted_velocity(x, sigma, cond, velocity=velocity):
            if not torch.is_grad_enabled():  # the loss's log-prob passes are train.micro_batch_size's
                rows.append(int(x.shape[0]))
            return velocity(x, sigma, cond)

        def counted_decode(x0, decode=decode):
            rows.append(int(x0.shape[0]))
            return decode(x0)

        monkeypatch.setattr(run.policy, "velocity", counted_velocity)
        monkeypatch.setattr(run.policy, "decode", counted_decode)
        history = calibrate(run)
        record = {k: v for k, v in train_step(run).items() if not k.endswith("_s")}
        assert max(rows) == (3 if chunk else 8 * 5)  # unset: the dense engine decodes 5 states x 8 samples at once
        outcomes[chunk] = (history, record, run.policy.mu.detach().clone())
    assert outcomes[3][0] == outcomes[None][0] and outcomes[3][1] == outcomes[None][1]
    assert torch.equal(outcomes[3][2], outcomes[None][2])
