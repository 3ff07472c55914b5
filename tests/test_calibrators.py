"""Exploration calibrators: uniform (Flow-GRPO) and reward-aware (DenseGRPO Algorithm 1).

Algorithm 1 per step: n_pos = #(dR > 0), n_neg = #(dR < 0); |n_pos - n_neg| < eps1 ->
psi += eps2, otherwise psi -= eps2 (method.md section 4). Defaults eps1 = 2, eps2 = 0.01.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from densegrpo.components.calibrators.reward_aware import RewardAwareCalibrator
from densegrpo.components.calibrators.uniform import UniformCalibrator
from densegrpo.contracts import registry
from densegrpo.contracts.errors import ConfigError, UserError
from densegrpo.contracts.protocols import CalibrationStats, ExplorationCalibrator

NAN = math.nan


def grid(num_steps: int) -> torch.Tensor:
    return torch.linspace(1.0, 0.0, num_steps + 1)


def stats(columns: list[list[float]]) -> CalibrationStats:
    """``columns[k]`` = the gains of step k over the N samples."""
    gains = torch.tensor(columns, dtype=torch.float32).T.contiguous()  # (N, T)
    num_steps = gains.shape[1]
    return CalibrationStats(gains=gains, sigmas=grid(num_steps), noise_level=torch.full((num_steps,), 0.7))


BALANCED = [1.0, -1.0, 1.0, -1.0]  # n_pos 2, n_neg 2 -> |0| < 2
IMBALANCED = [1.0, 1.0, 1.0, 1.0]  # |4 - 0| >= 2


def approx(values: list[float]) -> list:
    return [pytest.approx(v, abs=1e-9) for v in values]


# --- uniform ---------------------------------------------------------------------------


def test_uniform_returns_the_constant_vector():
    calibrator = registry.load("calibrators", "uniform")
    assert isinstance(calibrator, ExplorationCalibrator)
    psi = calibrator.noise_level(grid(4))
    assert psi.dtype == torch.float32
    assert torch.equal(psi, torch.full((4,), 0.7, dtype=torch.float32))
    assert torch.equal(UniformCalibrator(UniformCalibrator.Config(noise_level=0.3)).noise_level(grid(2)), torch.tensor([0.3, 0.3]))
    calibrator.update(stats([IMBALANCED] * 4))  # no-op
    assert torch.equal(calibrator.noise_level(grid(4)), psi)
    assert calibrator.converged and calibrator.done and calibrator.history == []


def test_uniform_state_round_trip():
    calibrator = UniformCalibrator()
    state = json.loads(json.dumps(calibrator.state_dict()))
    UniformCalibrator().load_state_dict(state)
    with pytest.raises(ValueError, match="noise_level"):
        UniformCalibrator(UniformCalibrator.Config(noise_level=0.5)).load_state_dict(state)
    with pytest.raises(ConfigError):
        registry.load("calibrators", "uniform", {"noise_level": -0.1})


# --- reward-aware: one round -------------------------------------------------------------


def test_reward_aware_starts_at_initial():
    calibrator = registry.load("calibrators", "reward-aware")
    assert isinstance(calibrator, ExplorationCalibrator)
    assert torch.equal(calibrator.noise_level(grid(3)), torch.full((3,), 0.7, dtype=torch.float32))
    assert calibrator.config.eps1 == 2 and calibrator.config.eps2 == 0.01


def test_balanced_step_goes_up_and_imbalanced_steps_go_down():
    calibrator = RewardAwareCalibrator()
    calibrator.noise_level(grid(4))
    calibrator.update(
        stats(
            [
                [1.0, -1.0, 1.0, -1.0, 0.0],  # 2 vs 2: |0| < 2 -> +0.01
                [1.0, 1.0, -1.0, 1.0, -1.0],  # 3 vs 2: |1| < 2 -> +0.01
                [1.0, 1.0, 1.0, -1.0, 0.0],  # 3 vs 1: |2| is not < 2 -> -0.01
                [-1.0, -1.0, -1.0, -1.0, -1.0],  # 0 vs 5 -> -0.01
            ]
        )
    )
    assert calibrator.psi == approx([0.71, 0.71, 0.69, 0.69])
    torch.testing.assert_close(calibrator.noise_level(grid(4)), torch.tensor([0.71, 0.71, 0.69, 0.69]))
    entry = calibrator.history[-1]
    assert entry["round"] == 1
    assert entry["psi_before"] == approx([0.7] * 4)
    assert entry["n_pos"] == [2, 3, 3, 0]
    assert entry["n_neg"] == [2, 2, 1, 5]
    assert entry["balanced"] == [True, True, False, False]


def test_nan_gains_are_ignored_and_zero_gains_count_for_neither():
    calibrator = RewardAwareCalibrator()
    calibrator.update(
        stats(
            [
                [NAN, 1.0, -1.0, NAN],  # 1 vs 1 -> +0.01
                [NAN, 1.0, 1.0, 1.0],  # 3 vs 0 -> -0.01 (without the NaN filter it could not be 4)
                [NAN, NAN, NAN, NAN],  # no information -> unchanged
                [0.0, 0.0, 0.0, 1.0],  # 1 vs 0 -> +0.01
            ]
        )
    )
    assert calibrator.psi == approx([0.71, 0.69, 0.70, 0.71])
    assert calibrator.history[0]["n_valid"] == [2, 3, 0, 4]


def test_psi_is_clamped():
    high = RewardAwareCalibrator(RewardAwareCalibrator.Config(initial=1.495, clamp=(0.0, 1.5)))
    high.update(stats([BALANCED]))
    assert high.psi == approx([1.5])
    high.update(stats([BALANCED]))
    assert high.psi == approx([1.5])
    low = RewardAwareCalibrator(RewardAwareCalibrator.Config(initial=0.0, clamp=(0.0, 1.0)))
    low.update(stats([IMBALANCED]))
    assert low.psi == approx([0.0])


def test_psi_is_clamped_to_the_intersection_with_the_sampler_range():
    """cps accepts levels in [0, 1]: psi rising from 0.995 stops at 1.0, not at the clamp's 1.5."""
    free = RewardAwareCalibrator(RewardAwareCalibrator.Config(initial=0.995))
    limited = RewardAwareCalibrator(RewardAwareCalibrator.Config(initial=0.995))
    limited.limit_noise_level(*registry.load("samplers", "cps").noise_level_range)
    assert (free.bounds, limited.bounds) == ((0.0, 1.5), (0.0, 1.0))
    for calibrator in (free, limited):
        calibrator.update(stats([BALANCED, IMBALANCED]))
    assert free.psi == approx([1.005, 0.985]) and limited.psi == approx([1.0, 0.985])
    narrow = RewardAwareCalibrator(RewardAwareCalibrator.Config(initial=0.5, clamp=(0.2, 1.5)))
    narrow.limit_noise_level(0.0, 0.6)  # the tighter bound of each side
    assert narrow.bounds == (0.2, 0.6)
    narrow.load_state_dict({"psi": [0.9, 0.1], "history": []})  # a psi from elsewhere is clamped too
    assert narrow.psi == approx([0.6, 0.2])
    narrow.limit_noise_level(0.0, 0.55)
    assert narrow.psi == approx([0.55, 0.2])


def test_a_sampler_range_the_calibrator_cannot_meet_is_a_user_error():
    with pytest.raises(UserError, match="do not overlap"):
        RewardAwareCalibrator(RewardAwareCalibrator.Config(initial=1.3, clamp=(1.2, 1.5))).limit_noise_level(0.0, 1.0)
    with pytest.raises(UserError, match="calibrator.config.initial"):
        RewardAwareCalibrator(RewardAwareCalibrator.Config(initial=1.2)).limit_noise_level(0.0, 1.0)
    with pytest.raises(UserError, match="calibrator.config.noise_level"):
        UniformCalibrator(UniformCalibrator.Config(noise_level=1.2)).limit_noise_level(0.0, 1.0)
    UniformCalibrator(UniformCalibrator.Config(noise_level=1.0)).limit_noise_level(0.0, 1.0)  # the range is closed


def test_config_validation():
    with pytest.raises(ConfigError, match="clamp"):
        registry.load("calibrators", "reward-aware", {"clamp": [1.0, 0.5]})
    with pytest.raises(ConfigError, match="initial"):
        registry.load("calibrators", "reward-aware", {"initial": 2.0, "clamp": [0.0, 1.5]})
    with pytest.raises(ConfigError):
        registry.load("calibrators", "reward-aware", {"eps2": 0.0})


def test_number_of_steps_cannot_change():
    calibrator = RewardAwareCalibrator()
    calibrator.update(stats([BALANCED, BALANCED, BALANCED]))  # lazily sized T = 3
    assert len(calibrator.noise_level(grid(3))) == 3
    with pytest.raises(ValueError, match="T = 3"):
        calibrator.noise_level(grid(4))
    with pytest.raises(ValueError, match="T = 3"):
        calibrator.update(stats([BALANCED, BALANCED]))
    with pytest.raises(ValueError, match="sigmas"):
        calibrator.noise_level(torch.tensor([1.0]))


# --- reward-aware: rounds and convergence -------------------------------------------------


def test_alternating_rounds_converge_after_a_full_window():
    calibrator = RewardAwareCalibrator()
    assert calibrator.config.window == 4
    # psi: 0.70 -> 0.71 -> 0.70 -> 0.71 -> 0.70: a reversal every round
    for round_index, gains in enumerate([BALANCED, IMBALANCED, BALANCED, IMBALANCED], start=1):
        assert not calibrator.converged  # fewer than `window` rounds so far
        calibrator.update(stats([gains, gains]))
        assert calibrator.history[-1]["round"] == round_index
    assert calibrator.converged and calibrator.done
    assert [entry["psi"] for entry in calibrator.history] == [approx([v, v]) for v in (0.71, 0.70, 0.71, 0.70)]


def test_drifting_psi_does_not_converge_and_stops_at_max_rounds():
    calibrator = RewardAwareCalibrator(RewardAwareCalibrator.Config(max_rounds=6))
    for _ in range(6):
        assert not calibrator.done
        calibrator.update(stats([IMBALANCED]))
    assert calibrator.psi == approx([0.64])
    assert not calibrator.converged
    assert calibrator.done  # max_rounds
    assert len(calibrator.history) == 6


def test_creeping_psi_is_not_convergence():
    calibrator = RewardAwareCalibrator(RewardAwareCalibrator.Config(max_rounds=100))
    for gains in [BALANCED, BALANCED, IMBALANCED] * 5:
        calibrator.update(stats([gains]))
        assert not calibrator.converged  # up, up, down: net +eps2 every three rounds
    calibrator.update(stats([BALANCED]))
    assert not calibrator.converged  # last moves +, -, + after a +: psi 0.74, 0.75, 0.76, 0.75, 0.76
    calibrator.update(stats([IMBALANCED]))
    assert calibrator.converged  # +, -, +, -: psi 0.75 / 0.76 only
    assert calibrator.psi == approx([0.75])


def test_one_drifting_step_blocks_convergence():
    calibrator = RewardAwareCalibrator()
    for gains in [BALANCED, IMBALANCED, BALANCED, IMBALANCED, BALANCED]:
        calibrator.update(stats([gains, BALANCED]))  # step 1 keeps rising
    assert not calibrator.converged


def test_pinned_at_the_clamp_converges():
    calibrator = RewardAwareCalibrator(RewardAwareCalibrator.Config(initial=1.49, clamp=(0.0, 1.5)))
    for _ in range(4):
        calibrator.update(stats([BALANCED]))  # 1.49 -> 1.50, then pinned
    assert calibrator.psi == approx([1.5])
    assert calibrator.converged


def test_calibration_finds_the_noise_level_where_gains_turn_imbalanced():
    # a synthetic world: below psi* = 0.9 half the samples improve; above it most get worse
    calibrator = RewardAwareCalibrator(RewardAwareCalibrator.Config(max_rounds=50))
    sigmas = grid(2)
    while not calibrator.done:
        psi = calibrator.noise_level(sigmas)
        columns = [BALANCED if float(value) < 0.895 else [-1.0, -1.0, -1.0, 1.0] for value in psi]
        calibrator.update(CalibrationStats(torch.tensor(columns).T, sigmas, psi))
    assert calibrator.converged
    # 20 rounds up to 0.90, then 0.89, 0.90, 0.89: the window 0.89 .. 0.90 is clean after round 23
    assert calibrator.rounds == 23
    assert calibrator.psi == approx([0.89, 0.89])
    ups = [sum(entry["balanced"]) for entry in calibrator.history]
    assert ups == [2] * 20 + [0, 2, 0]


def noisy_world(calibrator: RewardAwareCalibrator, seed: int, psi_star: float = 0.8, p_above: float = 0.2) -> None:
    """P(dR > 0) = 0.5 below psi_star and p_above from it on; N = 32 samples, T = 10 steps."""
    generator = torch.Generator().manual_seed(seed)
    sigmas = grid(10)
    while not calibrator.done:
        psi = calibrator.noise_level(sigmas)
        p_pos = torch.where(psi < psi_star - 1e-6, 0.5, p_above)
        gains = torch.where(torch.rand(32, 10, generator=generator) < p_pos, 1.0, -1.0)
        calibrator.update(CalibrationStats(gains, sigmas, psi))


def test_noisy_gains_around_a_balance_point_converge():
    # eps1 = 10: fair gains are "balanced" with P(12 <= n_pos <= 20) = 0.89, gains with
    # P(dR > 0) = 0.1 with P = 3e-5, so every step climbs from 0.7 and then oscillates at 0.79 / 0.80
    for seed in range(3):
        calibrator = RewardAwareCalibrator(RewardAwareCalibrator.Config(eps1=10, max_rounds=300))
        noisy_world(calibrator, seed=seed, p_above=0.1)
        assert calibrator.converged, (seed, calibrator.rounds)
        assert calibrator.rounds >= 13  # 0.70 -> 0.80 takes at least 10 rounds plus a clean window
        assert all(0.775 < v < 0.805 for v in calibrator.psi), (seed, calibrator.psi)


def test_paper_threshold_with_even_n_demands_an_exact_tie():
    # With eps1 = 2 and N = 32, n_pos - n_neg is even, so "balanced" means n_pos = n_neg, which fair
    # gains give with P = C(32, 16) / 2^32 = 0.14: Algorithm 1 then lowers psi most rounds.
    calibrator = RewardAwareCalibrator(RewardAwareCalibrator.Config(max_rounds=40))
    noisy_world(calibrator, seed=1, psi_star=10.0)  # every step always fair
    ups = sum(sum(entry["balanced"]) for entry in calibrator.history)
    assert ups < 0.3 * 10 * calibrator.rounds
    assert max(calibrator.psi) < 0.7


def test_state_dict_round_trip_is_exact():
    torch.manual_seed(0)
    rounds = [torch.randn(16, 4) for _ in range(6)]
    original = RewardAwareCalibrator()
    for gains in rounds[:3]:
        original.update(CalibrationStats(gains, grid(4), original.noise_level(grid(4))))
    state = json.loads(json.dumps(original.state_dict()))  # JSON-safe
    resumed = RewardAwareCalibrator()
    resumed.load_state_dict(state)
    assert resumed.history == original.history and resumed.psi == original.psi
    for gains in rounds[3:]:
        for calibrator in (original, resumed):
            calibrator.update(CalibrationStats(gains, grid(4), calibrator.noise_level(grid(4))))
    assert resumed.psi == original.psi  # bit-identical floats
    assert resumed.history == original.history
    assert resumed.converged == original.converged
    with pytest.raises(ValueError, match="state_dict"):
        resumed.load_state_dict({"psi": [0.7]})
