"""Samplers against independent truth (method.md section 1).

The "policy" is the exact rectified-flow velocity of Gaussian data x0 ~ N(mu, s^2 I)
(densegrpo.contracts.testing.GaussianFlowPolicy), whose marginals N((1 - sigma) mu, (1 - sigma)^2 s^2
+ sigma^2) are known in closed form; log-densities come from torch.distributions.
"""

from __future__ import annotations

import math

import pytest
import torch
from densegrpo.components.samplers._gaussian import flow_sde_mean, flow_sde_std
from densegrpo.components.samplers.coarse_sde import CoarseSDESampler
from densegrpo.components.samplers.cps import CPSSampler
from densegrpo.components.samplers.flow_sde import FlowSDESampler
from densegrpo.components.samplers.ode import ODESampler
from densegrpo.components.samplers.sde_window import SDEWindowSampler
from densegrpo.contracts import registry
from densegrpo.contracts.testing import GaussianFlowPolicy
from densegrpo.method.sigmas import make_sigmas

MU, S = 0.7, 0.4  # method.md's marginal table uses x0 ~ N(0.7, 0.4^2)
SHAPE = (1, 8, 8)  # every latent dim is an independent draw: 64 values per sample


def rollout_stats(sampler, num_steps: int, noise_level: float, num_samples: int = 512,
                  std: float = S, seed: int = 0):
    """Per-state sample mean and std over all samples and dims, and the exact ones."""
    policy = GaussianFlowPolicy(MU, std, SHAPE)
    sigmas = make_sigmas(num_steps)
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((num_samples, *SHAPE), generator=generator)
    traj = sampler.rollout(policy, policy.encode([""] * num_samples), noise, sigmas,
                           torch.full((num_steps,), noise_level), generator=generator)
    latents = traj.latents.double()
    mean = latents.mean(dim=(0, 2, 3, 4))
    sd = latents.std(dim=(0, 2, 3, 4))
    sig = sigmas.double()
    true_mean = (1 - sig) * MU
    true_sd = torch.sqrt((1 - sig) ** 2 * std**2 + sig**2)
    return sigmas, mean, sd, true_mean, true_sd


def mean_within_sampling_error(mean, true_mean, true_sd, count: int) -> bool:
    """Every state's sample mean within 5 standard errors (plus a 0.005 floor) of the truth."""
    return bool(((mean - true_mean).abs() <= 5 * true_sd / math.sqrt(count) + 0.005).all())


def wrong_drift_mean(x, v, sigma, sigma_next, noise_level, cap):
    """Flow-SDE mean with 4 sigma in place of 2 sigma (a deliberately wrong drift)."""
    std_t = flow_sde_std(sigma, noise_level, cap)
    return x + (v + std_t**2 / (4.0 * sigma) * (x + (1.0 - sigma) * v)) * (sigma_next - sigma)



class WrongDriftSDE(FlowSDESampler):
    sde_mean = staticmethod(wrong_drift_mean)


def make_policy(dtype=torch.float32):
    shifts = {"red": 0.5, "blue": -0.3}
    return GaussianFlowPolicy(MU, S, (3, 4, 4), prompt_shifts=shifts, dtype=dtype)


ALL_SAMPLERS = {
    "ode": lambda: ODESampler(),
    "flow-sde": lambda: FlowSDESampler(),
    "cps": lambda: CPSSampler(),
    "sde-window": lambda: SDEWindowSampler(SDEWindowSampler.Config(window_size=3, seed=1)),
    "coarse-sde": lambda: CoarseSDESampler(),
}


def small_rollout(name: str, num_steps: int = 10, noise_level: float = 0.7, seed: int = 0,
                  policy=None, sampler=None):
    policy = policy if policy is not None else make_policy()
    sampler = sampler if sampler is not None else ALL_SAMPLERS[name]()
    prompts = ["red", "blue", "green", "red", "blue", "green"]
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(prompts), *policy.latent_shape), generator=generator)
    traj = sampler.rollout(policy, policy.encode(prompts), noise, make_sigmas(num_steps),
                           torch.full((num_steps,), noise_level), generator=generator)
    return policy, sampler, traj


# -- marginals ---------------------------------------------------------------------------

def test_many_step_ode_maps_noise_to_data() -> None:
    sigmas, mean, sd, true_mean, true_sd = rollout_stats(ODESampler(), 400, 0.0)
    assert abs(float(mean[-1]) - MU) < 0.01
    assert abs(float(sd[-1]) / S - 1) < 0.02
    assert mean_within_sampling_error(mean, true_mean, true_sd, 512 * 64)
    assert float(((sd - true_sd) / true_sd).abs().max()) < 0.02  # and every marginal on the way


@pytest.mark.parametrize("noise_level", [0.3, 0.7, 1.0])
def test_flow_sde_preserves_marginal_on_fine_grid(noise_level: float) -> None:
    sigmas, mean, sd, true_mean, true_sd = rollout_stats(FlowSDESampler(), 200, noise_level)
    rel = ((sd - true_sd) / true_sd).abs()
    # Away from sigma = 1 (see FlowSDESampler's docstring: the sigma == 1 cap makes the first
    # steps stiff; that transient does not shrink with T and is bounded separately below).
    away = sigmas.double() <= 0.95
    assert float(rel[away].max()) < 0.03, rel
    assert mean_within_sampling_error(mean, true_mean, true_sd, 512 * 64)
    assert float(rel.max()) < {0.3: 0.03, 0.7: 0.06, 1.0: 0.17}[noise_level]
    # method.md: final std 0.396 at T = 200 with the correct drift (a = 0.7).
    if noise_level == 0.7:
        assert abs(float(sd[-1]) - 0.396) < 0.005


def test_wrong_drift_fails_the_marginal_check() -> None:
    sigmas, mean, sd, true_mean, true_sd = rollout_stats(WrongDriftSDE(), 200, 0.7)
    rel = ((sd - true_sd) / true_sd).abs()
    assert float(rel[sigmas.double() <= 0.95].max()) > 0.2  # the check above would fail
    assert abs(float(sd[-1]) - 0.544) < 0.01  # method.md's table


def test_flow_sde_error_shrinks_as_grid_refines() -> None:
    errors = []
    for num_steps in (25, 50, 100, 200):
        _, _, sd, _, _ = rollout_stats(FlowSDESampler(), num_steps, 0.7)
        errors.append(abs(float(sd[-1]) - S))
    assert all(b < 0.7 * a for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("num_steps", [10, 200])
@pytest.mark.parametrize("noise_level", [0.5, 1.0])
def test_cps_preserves_coefficients(num_steps: int, noise_level: float) -> None:
    # CPS preserves the marginal when the clean estimate is exact (point-mass data): x_k is
    # then exactly N((1 - sigma) mu, sigma^2) at every step, on any grid, even T = 10.
    # (For spread-out data it substitutes a posterior mean and shrinks the variance; see
    # CPSSampler's docstring.)
    sigmas, mean, sd, true_mean, true_sd = rollout_stats(CPSSampler(), num_steps, noise_level,
                                                         std=1e-4)
    assert float(((sd - true_sd).abs() - 0.02 * true_sd).max()) < 1e-3
    assert mean_within_sampling_error(mean, true_mean, true_sd, 512 * 64)


def test_wrong_cps_coefficient_fails() -> None:
    def wrong_mean(x, v, sigma, sigma_next, noise_level, cap):
        return (x - sigma * v) * (1 - sigma_next) + (x + (1 - sigma) * v) * sigma_next

    class WrongCPS(CPSSampler):
        sde_mean = staticmethod(wrong_mean)

    sigmas, mean, sd, true_mean, true_sd = rollout_stats(WrongCPS(), 10, 0.5, std=1e-4)
    assert float(((sd - true_sd) / true_sd)[1:-1].abs().max()) > 0.1


@pytest.mark.parametrize("block", [2, 4])
def test_coarse_sde_preserves_marginal_on_fine_grid(block: int) -> None:
    sampler = CoarseSDESampler(CoarseSDESampler.Config(block=block))
    sigmas, mean, sd, true_mean, true_sd = rollout_stats(sampler, 200, 0.7)
    rel = ((sd - true_sd) / true_sd).abs()
    assert float(rel[sigmas.double() <= 0.95].max()) < 0.03, rel
    assert mean_within_sampling_error(mean, true_mean, true_sd, 512 * 64)
    assert abs(float(sd[-1]) - S) < 0.01


def test_coarse_sde_with_unprojected_correction_fails_the_marginal_check() -> None:
    # Flow-GRPO's full score correction with noise in a quarter of the dims: the other
    # directions are contracted with nothing to refill them, so the final std collapses.
    sampler = CoarseSDESampler(CoarseSDESampler.Config(block=2))
    sampler.sde_mean = flow_sde_mean
    sigmas, _, sd, _, true_sd = rollout_stats(sampler, 200, 0.7)
    assert float(((sd - true_sd) / true_sd).abs()[sigmas.double() <= 0.95].max()) > 0.2
    assert float(sd[-1]) < 0.3


# -- exactness of each step --------------------------------------------------------------

def test_noise_level_zero_flow_sde_equals_ode() -> None:
    _, _, ode = small_rollout("ode", noise_level=0.0)
    for name in ("flow-sde", "cps", "sde-window", "coarse-sde"):
        _, _, sde = small_rollout(name, noise_level=0.0)
        assert torch.allclose(sde.latents, ode.latents, atol=1e-6, rtol=0), name
        assert not bool(sde.trained_steps.any()) and bool((sde.log_probs == 0).all())
    # The stochastic means themselves reduce to Euler at a = 0 (not only the rollout branch).
    x, v = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    zero, cap = 0.0, 0.96
    for s, sn in [(1.0, 0.96), (0.6, 0.46), (0.0089, 0.0)]:
        euler = x + v * (sn - s)
        assert torch.allclose(FlowSDESampler.sde_mean(x, v, s, sn, zero, cap), euler, atol=1e-6)
        assert torch.allclose(CPSSampler.sde_mean(x, v, s, sn, zero, cap), euler, atol=1e-6)


def expected_mean_and_std(name: str, x, v, sigma: float, sigma_next: float, a: float, cap: float):
    """method.md section 1, written out independently of the package (float64)."""
    dt = sigma_next - sigma
    if name == "cps":
        std_t = sigma_next * math.sin(a * math.pi / 2)
        mean = (x - sigma * v) * (1 - sigma_next) + (x + (1 - sigma) * v) * math.sqrt(
            max(sigma_next**2 - std_t**2, 0.0))
        return mean, std_t
    std_t = a * math.sqrt(sigma / (1 - (cap if sigma == 1.0 else sigma)))
    mean = x + (v + std_t**2 / (2 * sigma) * (x + (1 - sigma) * v)) * dt
    return mean, std_t * math.sqrt(-dt)


@pytest.mark.parametrize("name", ["flow-sde", "cps", "sde-window"])
def test_log_probs_match_torch_distributions(name: str) -> None:
    policy, sampler, traj = small_rollout(name)
    sigmas = traj.sigmas.tolist()
    cap = sigmas[1]  # largest sigma below 1 on this grid
    step_kind = "cps" if name == "cps" else "flow-sde"
    assert bool(traj.trained_steps.any())
    for k in range(traj.num_steps):
        x, x_next = traj.latents[:, k].double(), traj.latents[:, k + 1].double()
        v = policy.velocity(traj.latents[:, k], torch.full((6,), sigmas[k]), traj.cond).double()
        assert torch.allclose(traj.velocities[:, k].double(), v, atol=1e-6)
        if not bool(traj.trained_steps[0, k]):
            assert float(traj.step_std[k]) == 0 and bool((traj.log_probs[:, k] == 0).all())
            assert torch.allclose(traj.means[:, k].double(), x + v * (sigmas[k + 1] - sigmas[k]),
                                  atol=1e-6)
            assert torch.equal(traj.latents[:, k + 1], traj.means[:, k])
            continue
        a = float(traj.noise_level[k])
        mean, std = expected_mean_and_std(step_kind, x, v, sigmas[k], sigmas[k + 1], a, cap)
        assert math.isclose(float(traj.step_std[k]), std, rel_tol=1e-5)
        assert torch.allclose(traj.means[:, k].double(), mean, atol=1e-5)
        expected = torch.distributions.Normal(traj.means[:, k].double(), std).log_prob(x_next)
        expected = expected.flatten(1).mean(dim=1)
        assert torch.allclose(traj.log_probs[:, k].double(), expected, atol=1e-4, rtol=1e-6)
        assert bool(torch.isfinite(traj.log_probs[:, k]).all())
    assert traj.trained_steps.dtype == torch.bool
    assert (traj.trained_steps == traj.trained_steps[:1]).all()  # same steps for every sample


def block_basis(channels: int, h: int, w: int, block: int) -> torch.Tensor:
    """``U (C*h*w, d)`` float64, written out: one column per (channel, square), 1/block on the
    square's pixels; its columns are orthonormal."""
    columns = []
    for c in range(channels):
        for i in range(0, h, block):
            for j in range(0, w, block):
                column = torch.zeros(channels, h, w, dtype=torch.float64)
                column[c, i : i + block, j : j + block] = 1.0 / block
                columns.append(column.flatten())
    return torch.stack(columns, dim=1)


def test_coarse_sde_step_matches_its_subspace_gaussian() -> None:
    policy, sampler, traj = small_rollout("coarse-sde")
    sigmas = traj.sigmas.tolist()
    cap = sigmas[1]
    U = block_basis(3, 4, 4, 2)  # d = 12 of D = 48
    assert torch.allclose(U.T @ U, torch.eye(12, dtype=torch.float64))
    P = U @ U.T
    for k in range(traj.num_steps):
        x, x_next = traj.latents[:, k].double().flatten(1), traj.latents[:, k + 1].double().flatten(1)
        v = traj.velocities[:, k].double().flatten(1)
        s, sn, a = sigmas[k], sigmas[k + 1], float(traj.noise_level[k])
        std_t = a * math.sqrt(s / (1 - (cap if s == 1.0 else s)))
        dt = sn - s
        mean = x + v * dt + (std_t**2 / (2 * s)) * dt * (x + (1 - s) * v) @ P
        std = std_t * math.sqrt(-dt)
        assert torch.allclose(traj.means[:, k].double().flatten(1), mean, atol=1e-5)
        residual = x_next - mean
        assert float((residual - residual @ P).abs().max()) < 1e-5  # the noise lies in range(P)
        assert float(residual.abs().max()) > 10 * 1e-5 or std < 1e-4
        density = torch.distributions.MultivariateNormal(mean @ U, covariance_matrix=std**2 * torch.eye(12, dtype=torch.float64))
        expected = density.log_prob(x_next @ U) / 12
        assert torch.allclose(traj.log_probs[:, k].double(), expected, atol=1e-4, rtol=1e-6)


def test_coarse_sde_block_one_is_flow_sde() -> None:
    _, _, flow = small_rollout("flow-sde", seed=2)
    _, _, coarse = small_rollout("coarse-sde", seed=2, sampler=CoarseSDESampler(CoarseSDESampler.Config(block=1)))
    assert torch.allclose(coarse.latents, flow.latents, atol=1e-5)
    assert torch.allclose(coarse.log_probs, flow.log_probs, atol=1e-4)


def test_coarse_sde_rejects_a_block_that_does_not_divide_the_latent() -> None:
    with pytest.raises(ValueError, match="divide"):
        small_rollout("coarse-sde", sampler=CoarseSDESampler(CoarseSDESampler.Config(block=3)))


@pytest.mark.parametrize("name", list(ALL_SAMPLERS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_recomputed_log_prob_gives_ratio_exactly_one(name: str, dtype) -> None:
    policy, sampler, traj = small_rollout(name, policy=make_policy(dtype))
    for field in ("latents", "log_probs", "means", "velocities", "sigmas", "step_std"):
        assert getattr(traj, field).dtype == torch.float32, field
    for k in range(traj.num_steps):
        log_prob, mean = sampler.log_prob(policy, traj, k)
        assert log_prob.shape == (6,) and mean.shape == (6, 3, 4, 4)
        assert torch.equal(log_prob, traj.log_probs[:, k])
        assert torch.equal(mean, traj.means[:, k])
        assert bool((torch.exp(log_prob - traj.log_probs[:, k]) == 1).all())
        # gradients reach the trainable parameters through the recomputed velocity
        policy.zero_grad()
        (log_prob.sum() + mean.sum()).backward()
        assert policy.mu.grad is not None and float(policy.mu.grad.abs().sum()) > 0


def test_flow_sde_last_step_is_sampled_with_finite_log_prob() -> None:
    _, _, traj = small_rollout("flow-sde")
    assert bool(traj.trained_steps[:, -1].all()) and float(traj.step_std[-1]) > 0
    assert bool(torch.isfinite(traj.log_probs).all())
    _, _, clean = small_rollout("flow-sde", sampler=FlowSDESampler(
        FlowSDESampler.Config(deterministic_last_step=True)))
    assert not bool(clean.trained_steps[:, -1].any()) and float(clean.step_std[-1]) == 0
    _, _, cps = small_rollout("cps")
    assert not bool(cps.trained_steps[:, -1].any())  # sigma_next = 0 => std 0 for CPS


# -- reproducibility, noise handling, windows --------------------------------------------

@pytest.mark.parametrize("name", ["flow-sde", "cps", "sde-window", "coarse-sde"])
def test_seeded_rollouts_are_reproducible(name: str) -> None:
    _, _, first = small_rollout(name, seed=3)
    _, _, again = small_rollout(name, seed=3)
    _, _, other = small_rollout(name, seed=4)
    assert torch.equal(first.latents, again.latents)
    assert torch.equal(first.log_probs, again.log_probs)
    assert not torch.equal(first.latents, other.latents)


def test_step_noise_fixes_the_draws() -> None:
    policy = make_policy()
    sigmas, level = make_sigmas(6), torch.full((6,), 0.7)
    noise = torch.randn(4, 3, 4, 4)
    step_noise = torch.randn(4, 6, 3, 4, 4)
    cond = policy.encode(["red"] * 4)
    traj = FlowSDESampler().rollout(policy, cond, noise, sigmas, level, step_noise=step_noise)
    for k in range(6):
        expected = traj.means[:, k] + traj.step_std[k] * step_noise[:, k]
        assert torch.allclose(traj.latents[:, k + 1], expected, atol=1e-6)
    with pytest.raises(ValueError, match="step_noise"):
        FlowSDESampler().rollout(policy, cond, noise, sigmas, level, step_noise=step_noise[:, :3])


def test_sde_window_trains_only_its_window() -> None:
    sampler = SDEWindowSampler(SDEWindowSampler.Config(window_size=2, window_start=4))
    _, _, traj = small_rollout("sde-window", sampler=sampler)
    expected = torch.zeros(10, dtype=torch.bool)
    expected[4:6] = True
    assert torch.equal(traj.trained_steps, expected.expand(6, 10))
    assert torch.equal(traj.noise_level > 0, expected)
    assert bool((traj.step_std[~expected] == 0).all()) and bool((traj.step_std[expected] > 0).all())


def test_sde_window_draw_is_seeded_per_call() -> None:
    config = SDEWindowSampler.Config(window_size=3, seed=7)
    first, second = SDEWindowSampler(config), SDEWindowSampler(config)
    starts = []
    for call in range(12):
        # a generator seeded per call (as the GRPO loop does per iteration) picks the window
        _, _, traj_a = small_rollout("sde-window", sampler=first, seed=call)
        _, _, traj_b = small_rollout("sde-window", sampler=second, seed=call)
        assert torch.equal(traj_a.trained_steps, traj_b.trained_steps)
        row = traj_a.trained_steps[0].nonzero().flatten().tolist()
        assert len(row) == 3 and row == list(range(row[0], row[0] + 3))
        starts.append(row[0])
    assert len(set(starts)) > 1 and max(starts) <= 7
    counter = SDEWindowSampler(config)  # without a generator, a per-call counter picks it
    drawn = [counter.window(10, call=c) for c in range(12)]
    assert len(set(drawn)) > 1 and counter.window(10, call=5) == drawn[5]  # restorable by call index
    limited = SDEWindowSampler(SDEWindowSampler.Config(window_size=2, max_window_start=1))
    assert all(limited.window(10, call=c)[0] <= 1 for c in range(20))


@pytest.mark.parametrize("config", [{"window_size": 11}, {"window_size": 2, "window_start": 9}])
def test_sde_window_rejects_windows_outside_the_grid(config) -> None:
    with pytest.raises(ValueError, match="window"):
        small_rollout("sde-window", sampler=SDEWindowSampler(SDEWindowSampler.Config(**config)))


def test_bad_grid_and_noise_level_raise() -> None:
    policy = make_policy()
    cond, noise = policy.encode(["red"] * 2), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="sigmas"):
        FlowSDESampler().rollout(policy, cond, noise, torch.tensor([0.0, 0.5, 1.0]), torch.ones(2))
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDESampler().rollout(policy, cond, noise, make_sigmas(4), torch.ones(3))
    with pytest.raises(ValueError, match="noise_level"):
        FlowSDESampler().rollout(policy, cond, noise, make_sigmas(4), -torch.ones(4))


@pytest.mark.parametrize("name", list(ALL_SAMPLERS))
def test_registered_and_loadable(name: str) -> None:
    sampler = registry.load("samplers", name, {})
    assert isinstance(sampler, type(ALL_SAMPLERS[name]()))


# -- the analytic policy itself and a real network ----------------------------------------

@pytest.mark.parametrize("sigma", [0.05, 0.3, 0.7, 0.95])
def test_gaussian_policy_velocity_is_the_regression_of_eps_minus_x0(sigma: float) -> None:
    # Monte Carlo: regress u = eps - x0 on x = (1 - sigma) x0 + sigma eps; the optimal
    # flow-matching velocity E[u | x] is that (linear) regression for Gaussian data.
    policy = GaussianFlowPolicy(MU, S, (1, 1, 1))
    generator = torch.Generator().manual_seed(0)
    x0 = MU + S * torch.randn(400_000, generator=generator, dtype=torch.float64)
    eps = torch.randn(400_000, generator=generator, dtype=torch.float64)
    x, u = (1 - sigma) * x0 + sigma * eps, eps - x0
    slope = float(((x - x.mean()) * (u - u.mean())).mean() / x.var())
    intercept = float(u.mean() - slope * x.mean())
    probe = torch.tensor([-1.0, 0.0, 1.0]).view(3, 1, 1, 1)
    v = policy.velocity(probe, torch.full((3,), sigma), policy.encode([""] * 3)).flatten().double()
    assert torch.allclose(v, intercept + slope * probe.flatten().double(), atol=0.01)


def test_gaussian_policy_reference_state_and_prompts() -> None:
    policy = GaussianFlowPolicy(MU, S, (3, 2, 2), prompt_shifts={"up": 1.0})
    x, sigma = torch.randn(2, 3, 2, 2), torch.full((2,), 0.5)
    cond = policy.encode(["up", "other"])
    base = policy.velocity(x, sigma, cond)
    with torch.no_grad():
        policy.mu.add_(0.3)
    moved = policy.velocity(x, sigma, cond)
    assert not torch.allclose(base, moved)
    with policy.reference() as reference:
        assert torch.equal(reference.velocity(x, sigma, cond), base)
    assert torch.equal(policy.velocity(x, sigma, cond), moved)
    state = policy.trainable_state_dict()
    fresh = GaussianFlowPolicy(MU, S, (3, 2, 2), prompt_shifts={"up": 1.0})
    fresh.load_trainable_state_dict(state)
    assert torch.equal(fresh.velocity(x, sigma, cond), moved)
    # the prompt shift moves the data mean: at sigma = 1 the velocity is x - mean(prompt)
    ones = torch.ones(2)
    same = x[:1].expand(2, -1, -1, -1)
    v1 = policy.velocity(same, ones, cond)
    assert torch.allclose(v1[0] - v1[1], torch.full((3, 2, 2), -1.0), atol=1e-6)
    images = policy.decode(torch.randn(4, 3, 2, 2) * 10)
    assert images.shape == (4, 3, 2, 2) and bool(((images >= 0) & (images <= 1)).all())


def _tiny_sd3_policy():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=1,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=16,
        caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=8,
    )

    class TinySD3:
        latent_shape = (3, 8, 8)
        device = torch.device("cpu")

        def encode(self, prompts):
            from densegrpo.contracts.protocols import Cond

            generator = torch.Generator().manual_seed(1)
            return Cond(prompt_embeds=torch.randn(len(prompts), 4, 16, generator=generator),
                        pooled_embeds=torch.randn(len(prompts), 16, generator=generator),
                        prompts=list(prompts))

        def velocity(self, x, sigma, cond):
            return model(hidden_states=x, encoder_hidden_states=cond.prompt_embeds,
                         pooled_projections=cond.pooled_embeds, timestep=sigma * 1000,
                         return_dict=False)[0]

    return TinySD3(), model


@pytest.mark.parametrize("name", ["flow-sde", "cps", "sde-window", "coarse-sde"])
def test_ratio_is_exactly_one_with_a_diffusers_transformer(name: str) -> None:
    policy, model = _tiny_sd3_policy()
    sampler = ALL_SAMPLERS[name]()
    sigmas = make_sigmas(4)
    cond = policy.encode(["a", "b", "c"])
    generator = torch.Generator().manual_seed(0)
    traj = sampler.rollout(policy, cond, torch.randn(3, 3, 8, 8, generator=generator), sigmas,
                           torch.full((4,), 0.7), generator=generator)
    for k in range(4):
        log_prob, mean = sampler.log_prob(policy, traj, k)
        assert torch.equal(log_prob, traj.log_probs[:, k]) and torch.equal(mean, traj.means[:, k])
        if bool(traj.trained_steps[0, k]):
            model.zero_grad()
            log_prob.sum().backward()
            assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in model.parameters())


@pytest.mark.parametrize("name", ["ode", "flow-sde", "cps", "dance-sde", "coarse-sde"])
def test_frame_axis_latents_sample_like_the_same_numbers_laid_out_as_an_image(name: str) -> None:
    # The step maths is elementwise with per-sample means over every non-batch dim, so a video
    # latent (N, C, F, h, w) must give exactly the trajectory of the image (N, C, F*h, w)
    # holding the same numbers; the policy is the same analytic Gaussian in both layouts.
    sampler = registry.load("samplers", name)
    video = GaussianFlowPolicy(mean=0.3, std=0.5, latent_shape=(3, 2, 4, 4))
    image = GaussianFlowPolicy(mean=0.3, std=0.5, latent_shape=(3, 8, 4))
    sigmas = make_sigmas(4, shift=3.0)
    level = torch.full((4,), 0.7)
    noise = torch.randn(2, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    step_noise = torch.randn(2, 4, 3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = video.encode(["a", "b"])
    with torch.no_grad():
        traj_video = sampler.rollout(video, cond, noise, sigmas, level, step_noise=step_noise)
        traj_image = sampler.rollout(image, cond, noise.reshape(2, 3, 8, 4), sigmas, level, step_noise=step_noise.reshape(2, 4, 3, 8, 4))
        log_prob, mean = sampler.log_prob(video, traj_video, 1)
    assert traj_video.latents.shape == (2, 5, 3, 2, 4, 4)
    assert torch.allclose(traj_video.latents.reshape(2, 5, 3, 8, 4), traj_image.latents, atol=1e-6)
    assert torch.allclose(traj_video.log_probs, traj_image.log_probs, atol=1e-6)
    assert torch.allclose(log_prob, traj_video.log_probs[:, 1], atol=1e-5) and torch.allclose(mean, traj_video.means[:, 1], atol=1e-5)
