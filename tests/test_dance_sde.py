"""The dance-sde sampler (DanceGRPO's constant-eta SDE, issue 19) against independent truth: its step
written out from DanceGRPO's ``flux_step``, the Gaussian log-density of torch.distributions, the Euler
step at eta = 0, the flow's closed-form marginals on a fine grid, and the sampler contract."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from densegrpo.components.samplers._gaussian import euler_mean
from densegrpo.components.samplers.dance_sde import DanceSDESampler
from densegrpo.components.samplers.ode import ODESampler
from densegrpo.contracts import registry
from densegrpo.contracts.protocols import Sampler, Trajectory, conform
from densegrpo.contracts.testing import GaussianFlowPolicy
from densegrpo.method.sigmas import make_sigmas

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

MU, S = 0.7, 0.4
PROMPTS = ["red", "blue", "green", "red", "blue", "green"]


def make_policy() -> GaussianFlowPolicy:
    return GaussianFlowPolicy(MU, S, (3, 4, 4), prompt_shifts={"red": 0.5, "blue": -0.3})


def rollout(sampler, eta: float, num_steps: int = 10, seed: int = 0, policy=None) -> tuple[GaussianFlowPolicy, Trajectory]:
    policy = policy if policy is not None else make_policy()
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn((len(PROMPTS), *policy.latent_shape), generator=generator)
    traj = sampler.rollout(policy, policy.encode(PROMPTS), noise, make_sigmas(num_steps), torch.full((num_steps,), eta),
                           generator=generator)
    return policy, traj


def flux_step_mean(x, v, sigma: float, sigma_next: float, eta: float):
    """DanceGRPO's flux_step (fastvideo/train_grpo_flux.py lines 141-153), float64, in its own
    score form: mean = x + dsigma v - eta^2 / 2 * score * dsigma, score = -(x - (1 - sigma) x0) / sigma^2."""
    dsigma = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    return x + dsigma * v + (-0.5 * eta**2 * score) * dsigma, eta * math.sqrt(-dsigma)


@pytest.mark.parametrize("eta", [0.3, 1.0])
def test_step_is_dancegrpo_flux_step_and_log_prob_is_the_gaussian_density(eta: float) -> None:
    policy, traj = rollout(DanceSDESampler(), eta)
    sigmas = traj.sigmas.tolist()
    assert bool(traj.trained_steps.all())  # every step is stochastic, the last included
    for k in range(traj.num_steps):
        x, x_next = traj.latents[:, k].double(), traj.latents[:, k + 1].double()
        v = traj.velocities[:, k].double()
        mean, std = flux_step_mean(x, v, sigmas[k], sigmas[k + 1], eta)
        assert math.isclose(float(traj.step_std[k]), std, rel_tol=1e-6)
        assert math.isclose(float(traj.std_t[k]), eta, rel_tol=1e-6)  # std_t = eta, without sqrt(-dt)
        assert torch.allclose(traj.means[:, k].double(), mean, atol=1e-5)
        expected = torch.distributions.Normal(traj.means[:, k].double(), std).log_prob(x_next).flatten(1).mean(dim=1)
        assert torch.allclose(traj.log_probs[:, k].double(), expected, atol=1e-4, rtol=1e-6)
        # the draw is the mean plus eta sqrt(-dt) times a standard normal: its residual has that scale
        assert float((x_next - mean).std()) == pytest.approx(std, rel=0.35)


def test_eta_zero_is_the_euler_ode_step() -> None:
    _, dance = rollout(DanceSDESampler(), 0.0)
    _, ode = rollout(ODESampler(), 0.0)
    assert torch.allclose(dance.latents, ode.latents, atol=1e-6, rtol=0)
    assert not bool(dance.trained_steps.any()) and bool((dance.log_probs == 0).all())
    # the stochastic mean itself reduces to Euler at eta = 0, not only the rollout's ODE branch
    x, v = torch.randn(4, 3, 4, 4), torch.randn(4, 3, 4, 4)
    for sigma, sigma_next in [(1.0, 0.96), (0.6, 0.46), (0.0089, 0.0)]:
        assert torch.equal(DanceSDESampler.sde_mean(x, v, sigma, sigma_next, 0.0, 0.96), euler_mean(x, v, sigma, sigma_next))
        assert not torch.allclose(DanceSDESampler.sde_mean(x, v, sigma, sigma_next, 0.5, 0.96), euler_mean(x, v, sigma, sigma_next))


def marginal_error(sampler, eta: float, num_steps: int = 200, samples: int = 512) -> float:
    """Largest relative error of the per-state std against the flow's N((1 - sigma) mu, ...) marginal."""
    policy = GaussianFlowPolicy(MU, S, (1, 8, 8))
    sigmas = make_sigmas(num_steps)
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn((samples, 1, 8, 8), generator=generator)
    traj = sampler.rollout(policy, policy.encode([""] * samples), noise, sigmas, torch.full((num_steps,), eta), generator=generator)
    sd = traj.latents.double().std(dim=(0, 2, 3, 4))
    sig = sigmas.double()
    true_sd = torch.sqrt((1 - sig) ** 2 * S**2 + sig**2)
    return float(((sd - true_sd) / true_sd).abs().max())


class DanceWithoutCorrection(DanceSDESampler):
    """eta sqrt(-dt) noise on the plain Euler mean: the score correction left out (a wrong drift)."""

    sde_mean = staticmethod(lambda x, v, sigma, sigma_next, eta, cap: euler_mean(x, v, sigma, sigma_next))


@pytest.mark.parametrize("eta", [0.3, 0.7])
def test_marginals_are_the_flows_on_a_fine_grid_and_a_wrong_drift_fails(eta: float) -> None:
    # measured: 1.6% (eta 0.3) and 0.7% (eta 0.7) at T = 200, no sigma = 1 transient (std_t has no cap)
    assert marginal_error(DanceSDESampler(), eta) < 0.03
    assert marginal_error(DanceWithoutCorrection(), eta) > 0.1  # 14% and 69%: the check can fail


def test_recomputed_log_prob_gives_ratio_exactly_one_and_gradients() -> None:
    policy, traj = rollout(DanceSDESampler(), 0.7)
    for k in range(traj.num_steps):
        log_prob, mean = DanceSDESampler().log_prob(policy, traj, k)
        assert torch.equal(log_prob, traj.log_probs[:, k]) and torch.equal(mean, traj.means[:, k])
        policy.zero_grad()
        log_prob.sum().backward()
        assert float(policy.mu.grad.abs().sum()) > 0


def test_sampler_contract_and_declared_noise_level_range() -> None:
    sampler = conform("samplers", DanceSDESampler())
    assert isinstance(sampler, Sampler)
    assert sampler.noise_level_range == (0.0, math.inf)
    undocumented = [name for name, info in DanceSDESampler.Config.model_fields.items() if not info.description]
    assert undocumented == [] and DanceSDESampler.__doc__
    policy, traj = rollout(sampler, 0.7, num_steps=4)
    assert traj.latents.shape == (6, 5, 3, 4, 4) and traj.log_probs.shape == (6, 4) and traj.std_t.shape == (4,)
    # same step_noise, same rollout: world-size invariant runs fix the draws this way
    step_noise = torch.randn(6, 4, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    noise = traj.latents[:, 0]
    first, second = (sampler.rollout(policy, traj.cond, noise, make_sigmas(4), torch.full((4,), 0.7), step_noise=step_noise)
                     for _ in range(2))
    assert torch.equal(first.latents, second.latents)
    with pytest.raises(ValueError, match="noise_level"):
        sampler.rollout(policy, traj.cond, noise, make_sigmas(4), torch.full((3,), 0.7))


def test_registered_by_entry_point_in_pyproject() -> None:
    """pyproject.toml registers it as every built-in; the installed metadata has it after
    `pip install -e .` (until then the registry finds it by 'module:attr')."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    target = pyproject["project"]["entry-points"]["densegrpo.samplers"]["dance-sde"]
    assert target == "densegrpo.components.samplers.dance_sde:DanceSDESampler"
    assert isinstance(registry.load("samplers", target, {}), DanceSDESampler)
    if "dance-sde" in registry.available("samplers"):
        assert isinstance(registry.load("samplers", "dance-sde", {}), DanceSDESampler)
