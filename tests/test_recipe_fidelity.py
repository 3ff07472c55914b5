"""Flow-GRPO's recipe in the loss (issue 19), pinned against hand-computed values: the KL form
(``train.kl``), the samples dropped for an all-zero advantage (``train.drop_zero_advantage``),
the noise-level range a sampler accepts and the steps a zero noise level leaves untrained.

The fake components below make every quantity of the loss a closed form of one scalar weight
``theta``, so the expected numbers are written out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from densegrpo.contracts import registry
from densegrpo.contracts.config import TrainConfig
from densegrpo.contracts.protocols import Cond, Trajectory, conform
from densegrpo.method.distributed import DataParallel, World
from densegrpo.method.grpo import (
    Learner,
    kept_rows,
    step_loss,
    untrained_zero_noise_steps,
    update_policy,
    zero_advantage_rows,
)
from loop_components import LinearSampler, ShiftPolicy

GRID = torch.tensor([1.0, 0.75, 0.5, 0.0])  # sigma_cap = 0.75; dt = -0.25, -0.25, -0.5


def rollout(sampler_name: str, theta: float = 0.2, level: float = 0.7, n: int = 2, **config) -> tuple[ShiftPolicy, object, Trajectory]:
    policy = ShiftPolicy(theta)
    sampler = registry.load("samplers", sampler_name, config)
    noise = torch.randn(n, 1, 2, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        traj = sampler.rollout(policy, policy.encode(["p"] * n), noise, GRID, torch.full((3,), level),
                               generator=torch.Generator().manual_seed(1))
    return policy, sampler, traj


# ----------------------------------------------------------------------------- 1. KL form
def test_flow_sde_records_std_t_without_sqrt_dt():
    _, _, traj = rollout("flow-sde")
    # std_t = a sqrt(sigma / (1 - sigma)), with 1 - 0.75 in the denominator at sigma = 1
    std_t = [0.7 * 2.0, 0.7 * math.sqrt(3.0), 0.7]
    assert traj.std_t.tolist() == pytest.approx(std_t, rel=1e-6)
    assert traj.step_std.tolist() == pytest.approx([std_t[0] * 0.5, std_t[1] * 0.5, std_t[2] * math.sqrt(0.5)], rel=1e-6)


@pytest.mark.parametrize("name, config", [("coarse-sde", {"block": 2}), ("sde-window", {"window_start": 1, "window_size": 1})])
def test_flow_sde_variants_record_the_same_std_t(name, config):
    _, _, traj = rollout(name, **config)
    steps = (traj.step_std > 0).nonzero().flatten().tolist()
    assert steps == ([0, 1, 2] if name == "coarse-sde" else [1])
    expected = [0.7 * 2.0, 0.7 * math.sqrt(3.0), 0.7]
    for k in range(3):
        assert float(traj.std_t[k]) == pytest.approx(expected[k] if k in steps else 0.0, rel=1e-6)


@pytest.mark.parametrize("name, config", [("cps", {}), ("sde-window", {"window_start": 0, "window_size": 2, "sde": "cps"})])
def test_cps_std_t_is_its_transition_std(name, config):
    _, _, traj = rollout(name, **config)
    assert torch.equal(traj.std_t, traj.step_std)
    # sigma_next sin(a pi / 2) at steps 0, 1 (the last, to sigma = 0, is deterministic)
    assert float(traj.std_t[0]) == pytest.approx(0.75 * math.sin(0.7 * math.pi / 2), rel=1e-6)


def test_a_trajectory_built_without_std_t_derives_it_by_the_flow_sde_relation():
    traj = Trajectory(
        latents=torch.zeros(1, 4, 1, 1, 1), log_probs=torch.zeros(1, 3), means=torch.zeros(1, 3, 1, 1, 1),
        velocities=torch.zeros(1, 3, 1, 1, 1), sigmas=GRID, noise_level=torch.zeros(3),
        step_std=torch.tensor([0.5, 0.0, 0.3]), trained_steps=torch.ones(1, 3, dtype=torch.bool),
        cond=Cond(prompt_embeds=torch.zeros(1, 1, 1)),
    )
    assert traj.std_t.tolist() == pytest.approx([0.5 / 0.5, 0.0, 0.3 / math.sqrt(0.5)], rel=1e-6)
    assert torch.equal(traj.select([0]).std_t, traj.std_t)


@pytest.mark.parametrize("kl, expected", [("flow-grpo", 0.1245**2 / (2 * 0.49)), ("exact", 0.1245**2 / (2 * 0.49 * 0.5))])
def test_kl_of_a_flow_sde_step_against_hand_values(kl, expected):
    """Step k = 2: sigma 0.5 -> 0, a = 0.7: std_t^2 = 0.49, d = std_t^2 / (2 sigma) = 0.49, so the
    mean moves by (1 + d (1 - sigma)) dt (v - v_ref) = 1.245 * -0.5 * 0.2 = -0.1245 per dimension.
    Flow-GRPO divides by 2 std_t^2; the exact KL by 2 std_t^2 (-dt), with -dt = 0.5."""
    policy, sampler, traj = rollout("flow-sde")
    train = TrainConfig(beta=1.0, kl=kl)
    term = step_loss(policy, sampler, traj, 2, torch.zeros(2), torch.ones(2, dtype=torch.bool), train)
    assert term.kl == pytest.approx(expected, rel=1e-5)
    assert float(term.loss.detach()) == pytest.approx(expected, rel=1e-5)  # A = 0: the loss is beta * KL
    # the exact form is 1 / (-dt) times Flow-GRPO's at every step: 4, 4 and 2 on this grid
    ratios = []
    for k in range(3):
        forms = [step_loss(policy, sampler, traj, k, torch.zeros(2), torch.ones(2, dtype=torch.bool), TrainConfig(beta=1.0, kl=f)).kl
                 for f in ("flow-grpo", "exact")]
        ratios.append(forms[1] / forms[0])
    assert ratios == pytest.approx([4.0, 4.0, 2.0], rel=1e-5)


def test_both_kl_forms_agree_for_cps():
    policy, sampler, traj = rollout("cps")
    use = torch.ones(2, dtype=torch.bool)
    flow, exact = (step_loss(policy, sampler, traj, 0, torch.zeros(2), use, TrainConfig(beta=1.0, kl=f)).kl for f in ("flow-grpo", "exact"))
    assert flow == exact > 0


def test_step_loss_passes_cfg_grad_to_loss_forward():
    policy, sampler, traj = rollout("flow-sde")
    for cfg_grad in ("both", "conditional"):
        step_loss(policy, sampler, traj, 0, torch.ones(2), torch.ones(2, dtype=torch.bool), TrainConfig(cfg_grad=cfg_grad))
    assert policy.cfg_grads == ["both", "conditional"]


def test_defaults_follow_flow_grpo():
    train = TrainConfig()
    assert (train.kl, train.cfg_grad, train.drop_zero_advantage) == ("flow-grpo", "conditional", True)
    for name in ("kl", "cfg_grad", "drop_zero_advantage"):
        assert "train_sd3.py" in TrainConfig.model_fields[name].description


# ----------------------------------------------------------------------------- 3. zero advantages
C = [1.0, 2.0, -1.0]
M = [0.5, 1.0, 2.0]
A = [1.0, 0.0, -2.0]  # the middle sample's advantage is zero at its only step
THETA, BETA, STD_T, STEP_STD = 0.5, 0.1, 0.5, 0.25


def hand_trajectory() -> Trajectory:
    latents = torch.tensor([C, M]).T.reshape(3, 2, 1, 1, 1)
    return Trajectory(
        latents=latents, log_probs=torch.zeros(3, 1), means=torch.zeros(3, 1, 1, 1, 1), velocities=torch.zeros(3, 1, 1, 1, 1),
        sigmas=torch.tensor([1.0, 0.0]), noise_level=torch.tensor([0.7]), step_std=torch.tensor([STEP_STD]),
        trained_steps=torch.ones(3, 1, dtype=torch.bool), cond=Cond(prompt_embeds=torch.zeros(3, 1, 1)), std_t=torch.tensor([STD_T]),
    )


def hand_update(rows: list[int], drop: bool) -> tuple[float, dict]:
    """``theta`` after one SGD step (lr 1, no clipping) on ``rows`` of the hand trajectory, and the logged numbers."""
    policy = ShiftPolicy(THETA)
    train = TrainConfig(beta=BETA, clip_range=10.0, grad_clip=1e9, timestep_fraction=1.0, drop_zero_advantage=drop)
    learner = Learner(policy, LinearSampler(), None, torch.optim.SGD([policy.theta], lr=1.0), DataParallel(World()), train, torch.tensor([1.0, 0.0]))
    advantages = torch.tensor(A)[rows].unsqueeze(1)
    dropped = zero_advantage_rows(advantages) if drop else None
    update = update_policy(learner, hand_trajectory().select(rows), advantages, dropped)
    return float(policy.theta.detach()), update


def hand_loss(rows: list[int]) -> tuple[float, float, float]:
    """``(policy_loss, kl, d loss / d theta)`` over ``rows``: ratio = exp(theta c) (old log-prob 0,
    no clipping at eps = 10), policy term -A exp(theta c), KL term (theta m)^2 / (2 std_t^2)."""
    n = len(rows)
    policy_loss = sum(-A[i] * math.exp(THETA * C[i]) for i in rows) / n
    kl = sum((THETA * M[i]) ** 2 / (2 * STD_T**2) for i in rows) / n
    grad = sum(-A[i] * C[i] * math.exp(THETA * C[i]) for i in rows) / n + BETA * sum(THETA * M[i] ** 2 / STD_T**2 for i in rows) / n
    return policy_loss, kl, grad


def test_zero_advantage_rows_are_those_zero_at_every_step():
    advantages = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.3, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    assert zero_advantage_rows(advantages).tolist() == [True, False, False, True]


def test_dropping_a_zero_advantage_sample_gives_the_loss_of_the_batch_without_it():
    theta_dropped, dropped = hand_update([0, 1, 2], drop=True)
    theta_without, without = hand_update([0, 2], drop=True)
    assert theta_dropped == theta_without
    assert (dropped["policy_loss"], dropped["kl"]) == (without["policy_loss"], without["kl"])
    policy_loss, kl, grad = hand_loss([0, 2])
    assert dropped["policy_loss"] == pytest.approx(policy_loss, rel=1e-6)
    assert dropped["kl"] == pytest.approx(kl, rel=1e-6)
    assert theta_dropped == pytest.approx(THETA - grad, rel=1e-6)
    assert dropped["zero_advantage_dropped"] == pytest.approx(1 / 3) and without["zero_advantage_dropped"] == 0.0
    assert dropped["nfe_train"] == 2 * 2  # the dropped row is not even run: 2 rows, policy + reference


def test_without_dropping_the_mean_includes_the_zero_advantage_sample():
    theta_kept, kept = hand_update([0, 1, 2], drop=False)
    policy_loss, kl, grad = hand_loss([0, 1, 2])
    assert kept["policy_loss"] == pytest.approx(policy_loss, rel=1e-6)
    assert kept["kl"] == pytest.approx(kl, rel=1e-6)
    assert theta_kept == pytest.approx(THETA - grad, rel=1e-6)
    assert kept["zero_advantage_dropped"] == 0.0
    assert abs(theta_kept - hand_update([0, 2], drop=True)[0]) > 1e-3  # the two means differ: the test can fail


def test_a_batch_with_only_zero_advantages_makes_no_optimizer_step():
    theta, update = hand_update([1], drop=True)
    assert theta == THETA and update["nfe_train"] == 0 and update["zero_advantage_dropped"] == 1.0
    assert math.isnan(update["first_step_ratio_dev"])


def test_kept_rows_weight_each_rank_by_its_share_of_the_kept_rows():
    kept = torch.tensor([[True, False, True, False], [False, False, False, True]])  # (W = 2, n = 4)
    rows = [0, 1, 2, 3]
    # 3 kept rows, 1.5 per rank: DDP's average of (2 / 1.5) mean_0 and (1 / 1.5) mean_1 is their 3-row mean
    assert kept_rows(kept, rows, 0) == ([0, 2], pytest.approx(4 / 3))
    assert kept_rows(kept, rows, 1) == ([3], pytest.approx(2 / 3))
    assert kept_rows(kept, [2, 3], 1) == ([3], 1.0)
    assert kept_rows(kept, [1], 0) is None and kept_rows(kept, [1], 1) is None  # nobody keeps row 1: no step
    assert kept_rows(torch.tensor([[False, True], [True, True]]), [0], 0) == ([0], 0.0)  # runs a row, unused
    assert kept_rows(None, rows, 1) == (rows, 1.0)


# ----------------------------------------------------------------------------- 4. noise-level range
def test_samplers_declare_the_noise_levels_they_accept():
    assert registry.load("samplers", "cps").noise_level_range == (0.0, 1.0)
    assert registry.load("samplers", "sde-window", {"sde": "cps"}).noise_level_range == (0.0, 1.0)
    assert conform("samplers", registry.load("samplers", "flow-sde")).noise_level_range == (0.0, math.inf)


def test_untrained_zero_noise_steps_counts_zero_levels_among_the_trained_steps():
    levels = torch.tensor([0.7, 0.0, 0.5, 0.0])
    assert untrained_zero_noise_steps(levels, 0.99) == 1  # the last step is not trained at 0.99
    assert untrained_zero_noise_steps(levels, 1.0) == 2
    assert untrained_zero_noise_steps(torch.full((4,), 0.7), 1.0) == 0


def test_method_md_factors_between_the_kl_forms_on_the_default_grid():
    """docs/method.md section 2 lists 1 / (-dt) on the 10-step shift-3 grid; the flow-sde rollout's two
    stds give the same factors: (std_t / step_std)^2."""
    from densegrpo.method.sigmas import make_sigmas

    sigmas = make_sigmas(10, 3.0)
    listed = [25.1, 21.4, 18.0, 14.9, 12.0, 9.5, 7.3, 5.4, 3.7, 112.0]
    assert [round(float(1 / (sigmas[k] - sigmas[k + 1])), 1) for k in range(10)] == listed
    policy = ShiftPolicy(0.0)
    noise = torch.zeros(1, 1, 2, 2)
    with torch.no_grad():
        traj = registry.load("samplers", "flow-sde").rollout(policy, policy.encode(["p"]), noise, sigmas, torch.full((10,), 0.7),
                                                              generator=torch.Generator().manual_seed(0))
    factors = (traj.std_t / traj.step_std) ** 2
    assert factors.tolist() == pytest.approx([1 / float(sigmas[k] - sigmas[k + 1]) for k in range(10)], rel=1e-4)
