"""The dense-reward engine (method.md section 3) against independent computations."""

from __future__ import annotations

import pytest
import torch
from densegrpo.components.samplers.flow_sde import FlowSDESampler
from densegrpo.components.samplers.ode import ODESampler
from densegrpo.contracts.testing import (
    CountingPolicy,
    GaussianFlowPolicy,
    mean_brightness_reward,
)
from densegrpo.method.dense import (
    DenseRewardEngine,
    completion_grid,
    completion_steps,
    required_nfe,
)
from densegrpo.method.sigmas import make_sigmas

T, N = 10, 6
PROMPTS = ["red", "blue", "green", "red", "blue", "green"]


def brightness(images, rows):
    return mean_brightness_reward(images)


def make_policy():
    return GaussianFlowPolicy(0.7, 0.4, (3, 4, 4), prompt_shifts={"red": 0.5, "blue": -0.3})


def rollout(policy, sampler=None, num_steps: int = T, seed: int = 0):
    sampler = sampler if sampler is not None else FlowSDESampler()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((N, *policy.latent_shape), generator=generator)
    return sampler.rollout(policy, policy.encode(PROMPTS), noise, make_sigmas(num_steps),
                           torch.full((num_steps,), 0.7), generator=generator)


def manual_completion(policy, traj, k: int, grid: list[int]) -> torch.Tensor:
    """Euler along ``grid`` from latents[:, k] with fresh velocity calls, float64 steps."""
    x = traj.latents[:, k].double()
    sigmas = traj.sigmas.double()
    for here, there in zip(grid[:-1], grid[1:]):
        v = policy.velocity(x.float(), torch.full((N,), float(sigmas[here])), traj.cond).double()
        x = x + v * (sigmas[there] - sigmas[here])
    return x


@pytest.mark.parametrize("completion", ["t", 1, 2, 3, "t/2", "t/3", 20])
def test_batched_with_reuse_matches_naive(completion) -> None:
    policy = make_policy()
    traj = rollout(policy)
    batched = DenseRewardEngine(completion, "batched")
    naive = DenseRewardEngine(completion, "naive")
    est_b, _ = batched.clean_estimates(policy, traj)
    est_n, _ = naive.clean_estimates(policy, traj)
    assert torch.allclose(est_b, est_n, atol=1e-5, rtol=0)
    rewards_b = batched(policy, traj, brightness).rewards
    rewards_n = naive(policy, traj, brightness).rewards
    assert rewards_b.shape == (N, T + 1) and rewards_b.dtype == torch.float32
    assert torch.allclose(rewards_b, rewards_n, atol=1e-5, rtol=0)
    # and both follow the documented sub-grid, computed here with fresh velocities
    for k in range(T):
        grid = completion_grid(k, T, completion)
        assert torch.allclose(est_n[:, k].double(), manual_completion(policy, traj, k, grid), atol=1e-5)


def test_full_completion_gives_terminal_reward_and_ode_reward() -> None:
    policy = make_policy()
    traj = rollout(policy)
    dense = DenseRewardEngine("t")(policy, traj, brightness)
    terminal = mean_brightness_reward(policy.decode(traj.final))
    assert torch.equal(dense.rewards[:, 0], terminal)
    assert torch.equal(dense.terminal, terminal)
    # R_T is the reward of the pure-ODE sample from the same initial noise
    ode = ODESampler().rollout(policy, traj.cond, traj.latents[:, 0], traj.sigmas, traj.noise_level)
    assert torch.allclose(dense.rewards[:, T], mean_brightness_reward(policy.decode(ode.final)),
                          atol=1e-6)


def test_ode_trajectory_has_constant_dense_reward() -> None:
    # Completing any state of an ODE trajectory along the same grid retraces it exactly.
    policy = make_policy()
    traj = rollout(policy, ODESampler())
    rewards = DenseRewardEngine("t")(policy, traj, brightness).rewards
    assert torch.allclose(rewards, rewards[:, :1].expand(-1, T + 1), atol=1e-6)
    assert rewards.std(dim=1).max() < 1e-6


@pytest.mark.parametrize("mode, expected", [("batched", N * T * (T - 1) // 2),
                                            ("naive", N * T * (T + 1) // 2)])
def test_nfe_counters_are_exact(mode: str, expected: int) -> None:
    policy = CountingPolicy(make_policy())
    traj = rollout(policy)
    assert policy.rows == N * T
    policy.reset()
    dense = DenseRewardEngine("t", mode)(policy, traj, brightness)
    assert dense.nfe == expected == policy.rows == required_nfe(T, N, "t", mode)
    assert N * T + dense.nfe == (N * (T + T * (T - 1) // 2) if mode == "batched"
                                 else N * (T + T * (T + 1) // 2))
    assert dense.reward_calls == N * (T + 1)
    if mode == "batched":  # one batched round per grid sigma after the first
        assert policy.calls == T - 1


@pytest.mark.parametrize("completion", [1, 2, 3, "t/2", "t/4"])
@pytest.mark.parametrize("mode", ["batched", "naive"])
def test_nfe_counters_match_the_model_calls(completion, mode: str) -> None:
    policy = CountingPolicy(make_policy())
    traj = rollout(policy)
    policy.reset()
    dense = DenseRewardEngine(completion, mode, max_batch_size=7)(policy, traj, brightness)
    assert dense.nfe == policy.rows == required_nfe(T, N, completion, mode)
    assert max(policy.batch_sizes, default=0) <= 7


def test_max_batch_size_does_not_change_rewards() -> None:
    policy = CountingPolicy(make_policy())
    traj = rollout(policy)
    big = DenseRewardEngine("t", max_batch_size=256)(policy, traj, brightness)
    policy.reset()
    small = DenseRewardEngine("t", max_batch_size=5)(policy, traj, brightness)
    assert max(policy.batch_sizes) <= 5
    assert torch.allclose(big.rewards, small.rewards, atol=1e-6)
    assert big.nfe == small.nfe


def test_one_step_completion_is_the_x0_prediction() -> None:
    policy = CountingPolicy(make_policy())
    traj = rollout(policy)
    policy.reset()
    estimates, nfe = DenseRewardEngine(1).clean_estimates(policy, traj)
    assert nfe == 0 and policy.rows == 0  # batched mode: the rollout's velocity is enough
    for k in range(T):
        sigma = float(traj.sigmas[k])
        v = policy.velocity(traj.latents[:, k], torch.full((N,), sigma), traj.cond)
        assert torch.allclose(estimates[:, k], traj.latents[:, k] - sigma * v, atol=1e-6)
    assert torch.equal(estimates[:, T], traj.final)


def test_score_sees_rows_and_each_estimate_once() -> None:
    policy = make_policy()
    traj = rollout(policy)
    seen = []

    def by_row(images, rows):
        assert images.shape[1:] == (3, 4, 4) and rows.dtype == torch.long
        seen.append(rows.clone())
        return rows.to(torch.float32) * 10 + mean_brightness_reward(images)

    dense = DenseRewardEngine("t", max_batch_size=8)(policy, traj, by_row)
    rows = torch.cat(seen)
    assert rows.numel() == N * (T + 1) and torch.equal(rows.bincount(), torch.full((N,), T + 1))
    assert all(chunk.numel() <= 8 for chunk in seen)
    brightness_only = DenseRewardEngine("t")(policy, traj, brightness).rewards
    assert torch.allclose(dense.rewards - 10 * torch.arange(N).view(-1, 1), brightness_only, atol=1e-5)


def test_completion_grid_and_steps() -> None:
    assert completion_grid(0, 10, "t") == list(range(11))
    assert completion_grid(0, 10, 3) == [0, 3, 7, 10]  # floor(i * 10 / 3 + 1/2)
    assert completion_grid(5, 10, 2) == [5, 8, 10]  # t = 5, n = 2
    assert completion_grid(8, 10, 5) == [8, 9, 10]  # min(k, t)
    assert completion_grid(10, 10, "t") == [10]
    assert completion_grid(3, 10, 1) == [3, 10]
    assert [completion_steps(t, "t/3") for t in range(8)] == [0, 1, 1, 1, 2, 2, 2, 3]
    assert [completion_steps(t, 2) for t in range(4)] == [0, 1, 2, 2]
    for t in range(1, 12):
        for n in range(1, t + 1):
            grid = completion_grid(0, t, n)
            assert len(grid) == n + 1 and grid[0] == 0 and grid[-1] == t
            assert all(b > a for a, b in zip(grid, grid[1:]))
    assert required_nfe(10, 1, "t", "batched") == 45 and required_nfe(10, 1, "t", "naive") == 55


@pytest.mark.parametrize("completion", [0, -1, "x", "t/0", True, 2.5, "t/"])
def test_bad_completion_raises(completion) -> None:
    with pytest.raises(ValueError, match="completion"):
        DenseRewardEngine(completion)


def test_bad_mode_batch_size_and_score_raise() -> None:
    with pytest.raises(ValueError, match="mode"):
        DenseRewardEngine("t", "fast")
    with pytest.raises(ValueError, match="max_batch_size"):
        DenseRewardEngine("t", max_batch_size=0)
    policy = make_policy()
    traj = rollout(policy, num_steps=3)
    with pytest.raises(ValueError, match="score"):
        DenseRewardEngine("t")(policy, traj, lambda images, rows: torch.zeros(len(rows) + 1))
    with pytest.raises(ValueError, match="score"):
        DenseRewardEngine("t")(policy, traj, lambda images, rows: torch.zeros(len(rows), 2, 2))


def test_several_rewards_per_image_keep_their_column() -> None:
    policy = make_policy()
    traj = rollout(policy)

    def two(images, rows):
        return torch.stack([mean_brightness_reward(images), rows.to(torch.float32)], dim=1)

    both = DenseRewardEngine("t", max_batch_size=7)(policy, traj, two).rewards
    assert both.shape == (N, T + 1, 2)
    assert torch.equal(both[..., 0], DenseRewardEngine("t")(policy, traj, brightness).rewards)
    assert torch.equal(both[..., 1], torch.arange(N, dtype=torch.float32).view(-1, 1).expand(N, T + 1))


@pytest.mark.parametrize("mode", ["batched", "naive"])
@pytest.mark.parametrize("completion", ["t", 2])
def test_chosen_states_match_the_full_engine_and_cost_only_their_completions(mode: str, completion) -> None:
    # The loop asks for x_0 .. x_2 only when the first two steps are trained.
    policy = CountingPolicy(make_policy())
    traj = rollout(policy)
    full = DenseRewardEngine(completion, mode)(policy, traj, brightness)
    policy.reset()
    states = [0, 1, 2]
    part = DenseRewardEngine(completion, mode)(policy, traj, brightness, states)
    by_step_full, by_step_part = full.by_step_index(), part.by_step_index()
    scored = states + [T]  # the final sample is always scored: it is the terminal reward
    assert torch.equal(by_step_part[:, scored], by_step_full[:, scored])
    skipped = [k for k in range(T + 1) if k not in scored]
    assert torch.isnan(by_step_part[:, skipped]).all()
    # hand count: completing x_k takes n(T - k) Euler steps, the first one reused in batched mode
    reuse = 1 if mode == "batched" else 0
    expected = N * sum(completion_steps(T - k, completion) - reuse for k in states)
    assert part.nfe == policy.rows == expected == required_nfe(T, N, completion, mode, states)
    assert part.reward_calls == N * len(scored)
    # gains of the chosen steps are exact; the others are NaN
    assert torch.equal(part.gains()[:, :2], full.gains()[:, :2])
    assert torch.isnan(part.gains()[:, 2:]).all()


def test_states_out_of_range_are_refused() -> None:
    policy = make_policy()
    traj = rollout(policy)
    with pytest.raises(ValueError, match="step indices"):
        DenseRewardEngine("t")(policy, traj, brightness, [0, T + 1])


def test_frame_axis_latents_get_the_dense_rewards_of_the_same_numbers_laid_out_as_an_image() -> None:
    # Completions are Euler steps and the brightness reward is a mean over every pixel, so a video
    # policy (C, F, h, w) and the image policy (C, F*h, w) on the same numbers score alike.
    video = GaussianFlowPolicy(0.7, 0.4, (3, 2, 4, 4), prompt_shifts={"red": 0.5, "blue": -0.3})
    image = GaussianFlowPolicy(0.7, 0.4, (3, 8, 4), prompt_shifts={"red": 0.5, "blue": -0.3})
    generator = torch.Generator().manual_seed(0)
    noise, step_noise = torch.randn(N, 3, 2, 4, 4, generator=generator), torch.randn(N, T, 3, 2, 4, 4, generator=generator)
    sigmas, level = make_sigmas(T), torch.full((T,), 0.7)
    with torch.no_grad():
        traj_video = FlowSDESampler().rollout(video, video.encode(PROMPTS), noise, sigmas, level, step_noise=step_noise)
        traj_image = FlowSDESampler().rollout(image, image.encode(PROMPTS), noise.reshape(N, 3, 8, 4), sigmas, level,
                                              step_noise=step_noise.reshape(N, T, 3, 8, 4))
    assert traj_video.latents.shape == (N, T + 1, 3, 2, 4, 4)
    with torch.no_grad():
        dense_video = DenseRewardEngine(completion="t")(video, traj_video, brightness)
        dense_image = DenseRewardEngine(completion="t")(image, traj_image, brightness)
    assert video.decode(traj_video.final).shape == (N, 2, 3, 4, 4)
    assert torch.allclose(dense_video.rewards, dense_image.rewards, atol=1e-6)
    assert dense_video.nfe == dense_image.nfe > 0
