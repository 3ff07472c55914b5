"""The credit-assignment lab: its closed-form base against independent truth, its reward, its
policy through the shared adapter, and a short training run that learns."""

from __future__ import annotations

import math

import pytest
import torch
from densegrpo.bench.lab import LAB_OVERRIDES, lab_overrides
from densegrpo.components.samplers.ode import ODESampler
from densegrpo.contracts import config as cfg
from densegrpo.method.sigmas import make_sigmas
from densegrpo.worlds.lab import world
from densegrpo.worlds.lab.policy import LabPolicy
from densegrpo.worlds.lab.reward import LabReward


def marginal(t: float) -> torch.distributions.MixtureSameFamily:
    """``p_t`` of one coordinate on the path ``x_t = (1 - t) x0 + t eps``, built by torch.distributions."""
    means = world.component_means().double()
    scale = math.sqrt((1 - t) ** 2 * world.NOISE_STD**2 + t**2)
    mixing = torch.distributions.Categorical(probs=torch.full((means.numel(),), 1.0 / means.numel(), dtype=torch.float64))
    return torch.distributions.MixtureSameFamily(mixing, torch.distributions.Normal((1 - t) * means, torch.full_like(means, scale)))


@pytest.mark.parametrize("t", [0.95, 0.6, 0.3, 0.1, 0.02])
def test_velocity_is_the_tweedie_velocity_of_the_mixture(t):
    # Tweedie on p_t: E[eps | x_t] = -t * score, E[x0 | x_t] = (x_t - t E[eps | x_t]) / (1 - t), v = E[eps] - E[x0]
    x = torch.linspace(-3, 3, 241, dtype=torch.float64).requires_grad_(True)
    (score,) = torch.autograd.grad(marginal(t).log_prob(x).sum(), x)
    eps_hat = -t * score
    expected = eps_hat - (x.detach() - t * eps_hat) / (1 - t)
    got = world.velocity(x.detach().float()[:, None], torch.full((241,), t))[:, 0]
    torch.testing.assert_close(got.double(), expected, atol=2e-4, rtol=1e-4)


def test_velocity_matches_a_monte_carlo_conditional_mean():
    generator = torch.Generator().manual_seed(0)
    x0 = world.sample_data(400_000, 1, generator)[:, 0]
    eps = torch.randn(400_000, generator=generator)
    for t, q in ((0.8, -1.0), (0.5, 0.7), (0.2, 1.4)):
        near = ((1 - t) * x0 + t * eps - q).abs() < 0.01
        assert near.sum() > 200
        monte_carlo = float((eps - x0)[near].mean())
        closed_form = float(world.velocity(torch.tensor([[q]]), torch.tensor([t])))
        assert abs(monte_carlo - closed_form) < 0.06, (t, q, monte_carlo, closed_form)


def test_velocity_is_finite_at_both_ends():
    x = torch.linspace(-4, 4, 17)[:, None]
    for t in (0.0, 1.0):
        assert torch.isfinite(world.velocity(x, torch.full((17,), t))).all()
    # at t = 1 the best guess of x0 is the data mean 0, so v = eps = x
    torch.testing.assert_close(world.velocity(x, torch.ones(17)), x)


def test_the_base_policy_ode_draws_the_data_distribution():
    policy = LabPolicy(LabPolicy.Config(dim=64))
    cond = policy.encode(["pattern 3"] * 128)
    noise = torch.randn(128, 1, 1, 64, generator=torch.Generator().manual_seed(1))
    sigmas = make_sigmas(200, shift=1.0)
    traj = ODESampler().rollout(policy, cond, noise, sigmas, torch.zeros(200))
    x0 = traj.latents[:, -1].flatten()
    # every level's choice comes out +1 half the time, and each sample sits on a component
    signs = world.component_signs()
    nearest = (x0[:, None] - world.component_means()).abs().argmin(1)
    for level in range(len(world.AMPLITUDES)):
        share = float((signs[nearest, level] > 0).float().mean())
        assert abs(share - 0.5) < 0.03, (level, share)
    assert float((x0[:, None] - world.component_means()).abs().min(1).values.median()) < 0.05


def test_decision_times_order_coarse_before_detail():
    times = [world.decision_time(level) for level in range(len(world.AMPLITUDES))]
    assert times == sorted(times, reverse=True)
    assert times[0] == pytest.approx(2 / 3) and times[-1] == pytest.approx(1 / 9)


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_reward_reads_the_chosen_level_of_the_decoded_latent(stage):
    dim = 40
    target = world.pattern_signs("pattern 5", dim)
    other = torch.randint(0, 2, (3, dim, len(world.AMPLITUDES)), generator=torch.Generator().manual_seed(2)).float() * 2 - 1
    amplitudes = torch.tensor(world.AMPLITUDES)
    matching, opposite = other.clone(), other.clone()
    matching[..., stage], opposite[..., stage] = target, -target
    reward = LabReward(LabReward.Config(stage=stage))
    for signs, expected in ((matching, 1.0), (opposite, 0.0)):
        images = world.encode_image((signs @ amplitudes)[:, None, None, :])
        assert images.shape == (3, 3, 1, dim) and float(images.min()) > 0 and float(images.max()) < 1
        torch.testing.assert_close(reward(images, ["pattern 5"] * 3, [None] * 3), torch.full((3,), expected), atol=1e-3, rtol=0)


def test_reward_of_the_data_distribution_is_one_half():
    x0 = world.sample_data(4096, 32, torch.Generator().manual_seed(3))
    scores = LabReward()(world.encode_image(x0[:, None, None, :]), ["pattern 9"] * 4096, None)
    assert abs(float(scores.mean()) - 0.5) < 0.01


def test_decode_image_inverts_encode_image():
    x0 = torch.randn(5, 1, 1, 12) * 2
    torch.testing.assert_close(world.decode_image(world.encode_image(x0)), x0.reshape(5, 12), atol=1e-4, rtol=1e-4)


def test_bad_prompts_and_images_are_clear_errors():
    with pytest.raises(ValueError, match="pattern K"):
        world.pattern_signs("a photo of a cat", 4)
    with pytest.raises(ValueError, match=r"\(N,3,1,d\)"):
        LabReward()(torch.rand(2, 3, 32, 32), ["pattern 1"] * 2, None)


def test_patterns_are_fixed_draws_and_the_empty_prompt_is_unconditional():
    first = world.pattern_signs("pattern 7", 16)
    assert torch.equal(first, world.pattern_signs("pattern  7 ", 16))
    assert not torch.equal(first, world.pattern_signs("pattern 8", 16))
    assert set(first.tolist()) <= {-1.0, 1.0}
    cond = LabPolicy(LabPolicy.Config(dim=16)).encode(["pattern 7", ""])
    assert cond.prompt_embeds.shape == (2, 1, 16)
    assert torch.equal(cond.prompt_embeds[0, 0], first) and not cond.prompt_embeds[1].any()


@pytest.mark.parametrize("lora", [False, True])
def test_untrained_policy_is_the_closed_form_base_and_its_reference_stays_there(lora):
    policy = LabPolicy(LabPolicy.Config(dim=8, lora={"enabled": lora}))
    x, sigma = torch.randn(4, 1, 1, 8), torch.rand(4)
    cond = policy.encode(["pattern 1"] * 4)
    torch.testing.assert_close(policy.velocity(x, sigma, cond), world.velocity(x, sigma))
    assert policy.trainable_parameters()
    with torch.no_grad():
        for param in policy.trainable_parameters():
            param.add_(0.1)
    assert not torch.allclose(policy.velocity(x, sigma, cond), world.velocity(x, sigma))
    with policy.reference():
        torch.testing.assert_close(policy.velocity(x, sigma, cond), world.velocity(x, sigma))


def test_lab_overrides_set_the_three_dials():
    config = cfg.resolve(None, lab_overrides(dim=8, steps=6, stage=2))
    assert (config.policy.name, config.policy.config["dim"]) == ("lab", 8)
    assert (config.rewards[0].name, config.rewards[0].config["stage"]) == ("lab", 2)
    assert config.sampling.num_steps == config.sampling.eval_steps == 6
    assert cfg.resolve(None, LAB_OVERRIDES).prompts.train == "lab-train"


@pytest.mark.slow
def test_a_short_lab_run_learns_on_held_out_patterns(tmp_path):
    from densegrpo.run.train import run_training

    config = cfg.resolve(None, [*lab_overrides(dim=16, iterations=12), "checkpoint_every=0", "logging.progress=false"])
    summary = run_training(config, tmp_path / "run")
    assert abs(summary["eval_reward_base"] - 0.5) < 0.03
    assert summary["eval_gain_final"] > 0.05
    assert summary["eval_gain_final"] > 5 * summary["eval_gain_se_final"]
