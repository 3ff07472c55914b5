"""Per-step controls of the loss (issue 19): GRPO-Guard's RatioNorm (``train.ratio_norm``) and the
per-step policy weights (``train.step_weighting``: GRPO-Guard's 1 / (-dt), TempFlow-GRPO's
noise-aware weights), pinned against hand-computed values.

As in tests/test_recipe_fidelity.py, the policy's velocity is one scalar weight ``theta``, so the
mean's move between two weights is a closed form: on the grid 1, 0.75, 0.5, 0 with a = 0.7, step
k = 2 (sigma 0.5 -> 0) has std_t^2 = 0.49, d = std_t^2 / (2 sigma) = 0.49, step_std s = 0.7 sqrt(0.5),
and mean_theta - mean_old = (1 + d (1 - sigma)) dt (theta - theta_old) = -0.6225 (theta - theta_old)
in every dimension."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from densegrpo.contracts import config as cfg
from densegrpo.contracts import registry
from densegrpo.contracts.config import TrainConfig
from densegrpo.contracts.errors import ConfigError
from densegrpo.contracts.protocols import Cond, Trajectory, conform
from densegrpo.method.distributed import DataParallel, World
from densegrpo.method.grpo import Learner, step_loss, update_policy
from densegrpo.method.ratio_norm import (
    gaussian_expected_log_ratio,
    normalized_log_ratio,
)
from densegrpo.method.step_weighting import step_weights
from loop_components import LinearSampler, ShiftPolicy

GRID = torch.tensor([1.0, 0.75, 0.5, 0.0])
MEAN_PER_THETA = 1.245 * -0.5  # d mean / d theta at step 2
STEP_STD = 0.7 * math.sqrt(0.5)


def rollout(sampler_name: str = "flow-sde", n: int = 2, shape=(1, 2, 2), **config):
    policy = ShiftPolicy(0.2, shape)
    sampler = conform("samplers", registry.load("samplers", sampler_name, config))
    noise = torch.randn(n, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traj = sampler.rollout(policy, policy.encode(["p"] * n), noise, GRID, torch.full((3,), 0.7),
                               generator=torch.Generator().manual_seed(1))
    return policy, sampler, traj


def recorded_eps(traj: Trajectory, k: int) -> torch.Tensor:
    """``(n,)`` mean over dims of the rollout's draw eps = (x_{k+1} - mean_old) / s (float64)."""
    return ((traj.latents[:, k + 1] - traj.means[:, k]).double() / float(traj.step_std[k])).flatten(1).mean(dim=1)


# ----------------------------------------------------------------------------- RatioNorm
def test_ratio_norm_by_hand_on_a_flow_sde_step():
    policy, sampler, traj = rollout()
    k, delta_theta = 2, 0.1
    assert float(traj.step_std[k]) == pytest.approx(STEP_STD, rel=1e-6)
    policy.theta.data.fill_(0.2 + delta_theta)
    dmu, s, eps = MEAN_PER_THETA * delta_theta, STEP_STD, recorded_eps(traj, k)
    log_prob, mean = sampler.log_prob(policy, traj, k)
    raw = (log_prob - traj.log_probs[:, k]).detach().double()
    # log r = (2 s dmu mean(eps) - dmu^2) / (2 s^2): left-shifted by dmu^2 / (2 s^2)
    assert torch.allclose(raw, (2 * s * dmu * eps - dmu**2) / (2 * s**2), atol=1e-5)
    expected = sampler.expected_log_ratio(mean, traj.means[:, k], s)
    assert torch.allclose(expected.double(), torch.full((2,), -dmu**2 / (2 * s**2), dtype=torch.float64), rtol=1e-4)
    normalized = normalized_log_ratio(log_prob - traj.log_probs[:, k], expected, s)
    assert torch.allclose(normalized.double(), dmu * eps, atol=1e-6)  # s (log r - E[log r]) = <eps, dmu>
    # GRPO-Guard's code, literally (scripts/train_sd3_GRPO_Guard.py lines 917-919)
    bias = (mean - traj.means[:, k]).pow(2).mean(dim=(1, 2, 3)) / (2 * s**2)
    reference = torch.exp((log_prob - traj.log_probs[:, k] + bias) * s)
    assert torch.allclose(torch.exp(normalized), reference, rtol=1e-6)

    # the loss: A = (1, -1), no clipping at eps = 10, no KL; L = mean(-A exp(dmu eps)) and its gradient
    A = torch.tensor([1.0, -1.0])
    use = torch.ones(2, dtype=torch.bool)
    for ratio_norm, log_ratio in ((True, dmu * eps), (False, raw)):
        policy.zero_grad()
        term = step_loss(policy, sampler, traj, k, A, use, TrainConfig(ratio_norm=ratio_norm, clip_range=10.0, beta=0.0))
        hand = float((-A.double() * torch.exp(log_ratio)).mean())
        assert term.policy_loss == pytest.approx(hand, rel=1e-5)
        term.loss.backward()
        if ratio_norm:  # d/dtheta of -A exp(dmu(theta) eps) = -A exp(.) eps d dmu / d theta
            grad = float((-A.double() * torch.exp(log_ratio) * eps * MEAN_PER_THETA).mean())
            assert float(policy.theta.grad) == pytest.approx(grad, rel=1e-4)


def test_ratio_norm_centres_the_log_ratio_where_the_plain_one_is_left_shifted():
    """Over many draws of the rollout, E[log r_norm] = 0 while E[log r] = -dmu^2 / (2 s^2) < 0."""
    policy, sampler, traj = rollout(n=4096)
    k, delta_theta = 2, 0.05
    policy.theta.data.fill_(0.2 + delta_theta)
    dmu, s = MEAN_PER_THETA * delta_theta, STEP_STD
    with torch.no_grad():
        log_prob, mean = sampler.log_prob(policy, traj, k)
    raw = log_prob - traj.log_probs[:, k]
    normalized = normalized_log_ratio(raw, sampler.expected_log_ratio(mean, traj.means[:, k], s), s)
    shift = dmu**2 / (2 * s**2)
    # standard errors: std(log r) = |dmu| / (2 s) over the 4 dims, std(log r_norm) = |dmu| / 2
    assert abs(float(raw.mean()) + shift) < 5 * abs(dmu) / (2 * s) / 64
    assert abs(float(normalized.mean())) < 5 * abs(dmu) / 2 / 64
    assert float(raw.mean()) < -0.5 * shift  # the left shift RatioNorm removes: the test can fail
    assert float(normalized.std()) == pytest.approx(abs(dmu) / 2, rel=0.05)
    assert float(raw.std()) == pytest.approx(abs(dmu) / (2 * s), rel=0.05)


def test_ratio_norm_keeps_the_first_inner_step_ratio_exactly_one():
    policy, sampler, traj = rollout()
    for k in range(3):
        term = step_loss(policy, sampler, traj, k, torch.ones(2), torch.ones(2, dtype=torch.bool), TrainConfig(ratio_norm=True))
        assert term.ratio_dev_max == 0.0 and term.clipfrac == 0.0


def test_coarse_sde_centres_in_its_noise_subspace():
    """Block 2 on a 2 x 2 latent: one coordinate, the square's sum / 2. A uniform move dmu has the
    coordinate 2 dmu, so E[log r] = -(2 dmu)^2 / (2 s^2), four times the isotropic formula."""
    policy, sampler, traj = rollout("coarse-sde", block=2)
    k, delta_theta = 2, 0.1
    policy.theta.data.fill_(0.2 + delta_theta)
    dmu, s = MEAN_PER_THETA * delta_theta, STEP_STD
    log_prob, mean = sampler.log_prob(policy, traj, k)
    expected = sampler.expected_log_ratio(mean, traj.means[:, k], s)
    assert torch.allclose(expected.double(), torch.full((2,), -4 * dmu**2 / (2 * s**2), dtype=torch.float64), rtol=1e-4)
    assert torch.allclose(gaussian_expected_log_ratio(mean, traj.means[:, k], s), expected / 4, rtol=1e-5)
    coordinate = (traj.latents[:, k + 1] - traj.means[:, k]).double().flatten(1).sum(dim=1) / 2 / s  # U^T eps
    normalized = normalized_log_ratio(log_prob - traj.log_probs[:, k], expected, s)
    assert torch.allclose(normalized.double(), 2 * dmu * coordinate, atol=1e-6)


def test_samplers_without_their_own_get_the_isotropic_expected_log_ratio():
    class Bare:
        def rollout(self, *args, **kwargs):
            pass

        def log_prob(self, policy, traj, step):
            pass

    assert conform("samplers", Bare()).expected_log_ratio is gaussian_expected_log_ratio
    for name in ("flow-sde", "cps", "sde-window", "ode"):
        assert conform("samplers", registry.load("samplers", name)).expected_log_ratio is gaussian_expected_log_ratio
    mean, old = torch.full((3, 1, 2, 2), 0.5), torch.zeros(3, 1, 2, 2)
    assert torch.allclose(gaussian_expected_log_ratio(mean, old, 0.5), torch.full((3,), -0.25 / (2 * 0.25)))


# ----------------------------------------------------------------------------- step weights
def test_step_weights_by_hand():
    step_std = torch.tensor([0.7, 0.7 * math.sqrt(3) * 0.5, 0.7 * math.sqrt(0.5)])
    every, first_two = torch.tensor([True, True, True]), torch.tensor([True, True, False])
    assert step_weights(GRID, step_std, every, "none").tolist() == [1.0, 1.0, 1.0]
    assert step_weights(GRID, step_std, every, "grpo-guard").tolist() == pytest.approx([4.0, 4.0, 2.0])  # 1 / (-dt)
    assert step_weights(GRID, step_std, every, "tempflow").tolist() == pytest.approx((step_std / step_std.mean()).tolist())
    tempflow = step_weights(GRID, step_std, first_two, "tempflow")
    assert tempflow.tolist() == pytest.approx((step_std / step_std[:2].mean()).tolist())
    assert float(tempflow[:2].mean()) == pytest.approx(1.0)  # mean 1 over the trained steps
    assert step_weights(GRID, step_std, torch.zeros(3, dtype=torch.bool), "tempflow").tolist() == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="grpo-guard"):
        step_weights(GRID, step_std, every, "uniform")


def test_tempflow_weights_of_a_flow_sde_rollout_follow_its_transition_std():
    _, _, traj = rollout()
    weights = step_weights(traj.sigmas, traj.step_std, torch.tensor([True, True, False]), "tempflow")
    s = [0.7 * 2.0 * 0.5, 0.7 * math.sqrt(3.0) * 0.5]  # std_t sqrt(-dt) at steps 0 and 1
    assert weights[:2].tolist() == pytest.approx([s[0] / (sum(s) / 2), s[1] / (sum(s) / 2)], rel=1e-6)


STATES = [[0.5, 1.0, -1.0, 2.0], [1.5, -0.5, 0.25, 1.0]]  # (n = 2, T + 1 = 4)
ADVANTAGES = [[1.0, -2.0, 0.5], [-1.0, 1.5, 2.0]]  # (n, T)
THETA, BETA, STD_T = 0.3, 0.1, [0.8, 0.6, 0.4]
TRANSITION_STD = [0.4, 0.3, 0.2]


def weighted_update(form: str) -> float:
    """``theta`` after one SGD step (lr 1) with train.step_weighting = form."""
    policy = ShiftPolicy(THETA)
    traj = Trajectory(
        latents=torch.tensor(STATES).reshape(2, 4, 1, 1, 1), log_probs=torch.zeros(2, 3), means=torch.zeros(2, 3, 1, 1, 1),
        velocities=torch.zeros(2, 3, 1, 1, 1), sigmas=GRID, noise_level=torch.full((3,), 0.7),
        step_std=torch.tensor(TRANSITION_STD), trained_steps=torch.ones(2, 3, dtype=torch.bool),
        cond=Cond(prompt_embeds=torch.zeros(2, 1, 1)), std_t=torch.tensor(STD_T),
    )
    train = TrainConfig(beta=BETA, clip_range=10.0, grad_clip=1e9, timestep_fraction=1.0, step_weighting=form)
    learner = Learner(policy, LinearSampler(), None, torch.optim.SGD([policy.theta], lr=1.0), DataParallel(World()), train, GRID)
    update_policy(learner, traj, torch.tensor(ADVANTAGES))
    return float(policy.theta.detach())


@pytest.mark.parametrize("form, weights", [
    ("none", [1.0, 1.0, 1.0]),
    ("grpo-guard", [4.0, 4.0, 2.0]),
    ("tempflow", [0.4 / 0.3, 1.0, 0.2 / 0.3]),
])
def test_update_weights_each_steps_policy_term_and_not_the_kl(form, weights):
    """Gradient of step k: w_k mean_i(-A_ik c_ik exp(theta c_ik)) + beta mean_i(theta m_ik^2 / std_t_k^2),
    averaged over the 3 steps (loss / len(steps))."""
    grad = 0.0
    for k in range(3):
        policy = sum(-ADVANTAGES[i][k] * STATES[i][k] * math.exp(THETA * STATES[i][k]) for i in range(2)) / 2
        kl = sum(THETA * STATES[i][k + 1] ** 2 / STD_T[k] ** 2 for i in range(2)) / 2
        grad += (weights[k] * policy + BETA * kl) / 3
    assert weighted_update(form) == pytest.approx(THETA - grad, rel=1e-6)


def test_the_weights_change_the_update():
    assert len({round(weighted_update(form), 9) for form in ("none", "grpo-guard", "tempflow")}) == 3


# ----------------------------------------------------------------------------- config
def test_defaults_keep_the_plain_flow_grpo_loss_and_bad_values_fail_up_front():
    train = TrainConfig()
    assert (train.ratio_norm, train.step_weighting) == (False, "none")
    assert cfg.resolve(None, ["train.ratio_norm=true", "train.step_weighting=tempflow"]).train.step_weighting == "tempflow"
    with pytest.raises(ConfigError, match="step_weighting"):
        cfg.resolve(None, ["train.step_weighting=uniform"])
    with pytest.raises(ConfigError, match="ratio_norm"):
        cfg.resolve(None, ["train.ratio_norm=maybe"])


def test_config_show_describe_lists_every_option_with_its_help_text():
    config = cfg.default_config()
    described = cfg.describe(config)
    assert yaml.safe_load(described) == yaml.safe_load(cfg.dump(config))  # comments only
    flat = " ".join(line.strip().lstrip("# ") for line in described.splitlines())
    for name in ("ratio_norm", "step_weighting", "minibatch_size"):
        assert f"{name}:" in described
        assert " ".join(TrainConfig.model_fields[name].description.split()) in " ".join(flat.split())
    assert "train_sd3_GRPO_Guard.py" in TrainConfig.model_fields["ratio_norm"].description
    assert "TempFlow" in TrainConfig.model_fields["step_weighting"].description


def test_the_cli_prints_the_described_config(capsys):
    from densegrpo.cli.app import main

    with pytest.raises(SystemExit) as exit_info:
        main(["config", "show", "--describe", "--set", "train.step_weighting=tempflow"])
        raise SystemExit(0)
    assert (exit_info.value.code or 0) == 0
    out = capsys.readouterr().out
    assert "  # GRPO-Guard's RatioNorm" in out and "  step_weighting: tempflow" in out
    assert yaml.safe_load(out)["train"]["step_weighting"] == "tempflow"
