"""Advantage estimators against hand-computed numbers (method.md section 3).

Every expected value below is worked out by hand in the comments: group mean, population
std (ddof = 0, as Flow-GRPO's np.std), and the +1e-4 of both papers.
"""

from __future__ import annotations

import math

import pytest
import torch
from densegrpo.components.advantages._normalize import canonical_completion
from densegrpo.components.advantages.dense import DenseAdvantage
from densegrpo.components.advantages.dense_raw import DenseRawAdvantage
from densegrpo.components.advantages.dense_return import (
    DenseReturnAdvantage,
    discounted_reward_to_go,
)
from densegrpo.components.advantages.sparse import SparseAdvantage
from densegrpo.contracts import registry
from densegrpo.contracts.errors import ConfigError
from densegrpo.contracts.protocols import AdvantageEstimator, DenseRewards, RewardBatch
from densegrpo.method.multi_reward import combine_advantages, combine_rewards

EPS = 1e-4
NAN = math.nan


def sparse_batch(terminal: list[float], group_size: int, num_steps: int = 3) -> RewardBatch:
    return RewardBatch(torch.tensor(terminal), None, num_steps, group_size)


def dense_batch(rows: list[list[float]], group_size: int) -> RewardBatch:
    """``rows[i] = [R_0, R_1, ..., R_T]`` (papers' order)."""
    dense = torch.tensor(rows)
    return RewardBatch(dense[:, 0].clone(), dense, dense.shape[1] - 1, group_size)


def expected(rows: list[list[float]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def assert_close(actual: torch.Tensor, wanted: torch.Tensor) -> None:
    assert actual.dtype == torch.float32
    torch.testing.assert_close(actual, wanted, rtol=1e-5, atol=1e-6)


# --- sparse (Flow-GRPO) --------------------------------------------------------------


def test_sparse_group_std_two_groups_of_two():
    # group 1: R = [1, 3] -> mean 2, std 1;  group 2: R = [2, 6] -> mean 4, std 2
    estimator = SparseAdvantage(SparseAdvantage.Config(std="group"))
    advantages = estimator(sparse_batch([1, 3, 2, 6], group_size=2, num_steps=3))
    a, b = 1 / (1 + EPS), 2 / (2 + EPS)
    assert_close(advantages, expected([[-a] * 3, [a] * 3, [-b] * 3, [b] * 3]))


def test_sparse_group_std_group_of_three():
    # R = [0, 1, 2] -> mean 1, std sqrt(((-1)^2 + 0 + 1^2) / 3) = sqrt(2/3) = 0.81649658
    estimator = SparseAdvantage(SparseAdvantage.Config(std="group"))
    advantages = estimator(sparse_batch([0, 1, 2], group_size=3, num_steps=2))
    a = 1 / (0.81649658 + EPS)
    assert_close(advantages, expected([[-a, -a], [0, 0], [a, a]]))


def test_sparse_batch_std():
    # group means 2 and 4 as above; batch [1, 3, 2, 6]: mean 3,
    # var = (4 + 0 + 1 + 9) / 4 = 3.5, std = sqrt(3.5) = 1.87082869
    estimator = SparseAdvantage(SparseAdvantage.Config(std="batch"))
    advantages = estimator(sparse_batch([1, 3, 2, 6], group_size=2, num_steps=1))
    s = 1.87082869 + EPS
    assert_close(advantages, expected([[-1 / s], [1 / s], [-2 / s], [2 / s]]))


def test_sparse_default_is_flow_grpo_global_std():
    assert SparseAdvantage().config.std == "batch"
    assert SparseAdvantage().needs.dense is False


def test_sparse_nan_reward_gets_zero_and_is_excluded_and_counted():
    # group 1: [1, NaN, 3] -> valid {1, 3}: mean 2, std 1; group 2: [5, 5, 5] zero variance
    estimator = SparseAdvantage(SparseAdvantage.Config(std="group"))
    advantages = estimator(sparse_batch([1, NAN, 3, 5, 5, 5], group_size=3, num_steps=2))
    a = 1 / (1 + EPS)
    assert_close(advantages, expected([[-a, -a], [0, 0], [a, a], [0, 0], [0, 0], [0, 0]]))
    assert estimator.last_stats["nan_rewards"] == 1
    assert estimator.last_stats["nan_advantages"] == 2  # one sample x two steps
    assert estimator.last_stats["zero_std_ratio"] == 0.5


def test_sparse_batch_std_excludes_nan():
    # valid batch values {1, 3, 5, 5, 5}: mean 3.8, var = (7.84 + 0.64 + 3 * 1.44) / 5 = 2.56, std 1.6
    estimator = SparseAdvantage(SparseAdvantage.Config(std="batch"))
    advantages = estimator(sparse_batch([1, NAN, 3, 5, 5, 5], group_size=3, num_steps=1))
    a = 1 / (1.6 + EPS)
    assert_close(advantages, expected([[-a], [0], [a], [0], [0], [0]]))


def test_zero_variance_group_is_exactly_zero():
    # 0.1 is not exact in float32; the mean of equal values must still give 0, not noise / 1e-4
    for std in ("group", "batch"):
        estimator = SparseAdvantage(SparseAdvantage.Config(std=std))
        advantages = estimator(sparse_batch([0.1, 0.1, 0.1, 0.7, 0.7, 0.7], group_size=3, num_steps=2))
        assert torch.equal(advantages, torch.zeros(6, 2))
        assert estimator.last_stats["zero_std_ratio"] == 1.0


def test_single_valid_member_gives_zero():
    estimator = SparseAdvantage(SparseAdvantage.Config(std="group"))
    advantages = estimator(sparse_batch([NAN, 4.0, NAN, 1.0, 2.0, 3.0], group_size=3, num_steps=1))
    assert advantages[:3].abs().sum() == 0
    assert advantages[3:].abs().sum() > 0


# --- dense (DenseGRPO) ---------------------------------------------------------------

# rows are [R_0, R_1, R_2] (papers' order), T = 2, G = 2
#   a: R_2 = 0, R_1 = 1, R_0 = 3 -> step k=0 (t=2): R_1 - R_2 = 1; k=1 (t=1): R_0 - R_1 = 2
#   b: R_2 = 0, R_1 = 3, R_0 = 2 -> k=0: 3;                          k=1: -1
#   c, d: all zero -> zero variance at both steps
DENSE_ROWS = [[3, 1, 0], [2, 3, 0], [0, 0, 0], [0, 0, 0]]


def test_dense_gains_normalised_per_timestep_and_per_group():
    # k=0: gains [1, 3] -> mean 2, std 1;  k=1: gains [2, -1] -> mean 0.5, std 1.5
    estimator = DenseAdvantage()
    advantages = estimator(dense_batch(DENSE_ROWS, group_size=2))
    a, b = 1 / (1 + EPS), 1.5 / (1.5 + EPS)
    assert_close(advantages, expected([[-a, b], [a, -b], [0, 0], [0, 0]]))
    assert estimator.last_stats["zero_std_ratio"] == 0.5  # 2 of 4 (group, step) cells
    assert estimator.last_stats["nan_rewards"] == 0


def test_dense_uncentered_divides_the_gains_by_the_group_std():
    # one group of 4, one step: gains [0.25, 0, 0, 0] -> mean 0.0625,
    # population std sqrt((0.1875^2 + 3 * 0.0625^2) / 4) = sqrt(0.01171875)
    rows = [[0.25, 0.0], [0.0, 0.0], [0.5, 0.5], [1.0, 1.0]]
    std = 0.01171875**0.5
    centered = DenseAdvantage()(dense_batch(rows, group_size=4))
    assert_close(centered, expected([[0.1875 / (std + EPS)], [-0.0625 / (std + EPS)], [-0.0625 / (std + EPS)], [-0.0625 / (std + EPS)]]))
    uncentered = DenseAdvantage(DenseAdvantage.Config(center=False))(dense_batch(rows, group_size=4))
    assert_close(uncentered, expected([[0.25 / (std + EPS)], [0.0], [0.0], [0.0]]))
    # a cell whose gains are all equal has no contrast: 0 in both modes, not gain / 1e-4
    same = DenseAdvantage(DenseAdvantage.Config(center=False))(dense_batch([[1.0, 0.5], [0.5, 0.0]], group_size=2))
    assert_close(same, expected([[0.0], [0.0]]))


def test_dense_nan_reward_zeroes_the_gains_it_touches():
    # a: gains [1, 2]; b: R_1 = NaN -> both gains NaN; c = [1, 0, 0]: gains [0, 1]
    # k=0: valid {1, 0}: mean .5, std .5;  k=1: valid {2, 1}: mean 1.5, std .5
    estimator = DenseAdvantage()
    advantages = estimator(dense_batch([[3, 1, 0], [2, NAN, 0], [1, 0, 0]], group_size=3))
    a = 0.5 / (0.5 + EPS)
    assert_close(advantages, expected([[a, a], [0, 0], [-a, -a]]))
    assert estimator.last_stats["nan_rewards"] == 1
    assert estimator.last_stats["nan_advantages"] == 2


def test_dense_gains_match_the_papers_definition_and_telescope():
    torch.manual_seed(0)
    num_steps = 7
    dense = torch.randn(6, num_steps + 1)
    gains = DenseRewards(dense).gains()
    for k in range(num_steps):
        t = num_steps - k
        torch.testing.assert_close(gains[:, k], dense[:, t - 1] - dense[:, t])  # dR_t = R_{t-1} - R_t
    torch.testing.assert_close(gains.sum(dim=1), dense[:, 0] - dense[:, num_steps], rtol=1e-5, atol=1e-5)


def test_dense_equals_manual_per_step_normalisation_on_random_data():
    torch.manual_seed(1)
    group_size, num_steps = 4, 5
    dense = torch.randn(3 * group_size, num_steps + 1)
    advantages = DenseAdvantage()(RewardBatch(dense[:, 0], dense, num_steps, group_size))
    for g in range(3):
        rows = slice(g * group_size, (g + 1) * group_size)
        for k in range(num_steps):
            t = num_steps - k
            gain = (dense[rows, t - 1] - dense[rows, t]).double()
            want = (gain - gain.mean()) / (gain.std(unbiased=False) + EPS)
            torch.testing.assert_close(advantages[rows, k].double(), want, rtol=1e-4, atol=1e-5)


def test_dense_needs_and_completion_config():
    assert DenseAdvantage().needs.dense is True
    assert DenseAdvantage().needs.completion == "t"
    for given, canonical in [("t", "t"), (2, 2), ("3", 3), ("t/2", "t/2"), (" T / 4 ", "t/4"), ("t/1", "t")]:
        assert registry.load("advantages", "dense", {"completion": given}).needs.completion == canonical
    for bad in [0, -1, "x", "t/0", "2t", True, 1.5, None]:
        with pytest.raises(ConfigError, match="completion"):
            registry.load("advantages", "dense", {"completion": bad})
    with pytest.raises(ValueError):
        canonical_completion("t/")


# --- dense-raw ------------------------------------------------------------------------


def test_dense_raw_uses_reward_of_reached_state():
    # k=0 uses R_1: a 1, b 3 -> mean 2, std 1;  k=1 uses R_0: a 3, b 2 -> mean 2.5, std .5
    estimator = DenseRawAdvantage()
    advantages = estimator(dense_batch(DENSE_ROWS, group_size=2))
    a, b = 1 / (1 + EPS), 0.5 / (0.5 + EPS)
    assert_close(advantages, expected([[-a, b], [a, -b], [0, 0], [0, 0]]))
    # R_T (the pure-ODE reward) does not enter
    changed = [[3, 1, 0], [2, 3, 100], [0, 0, 5], [0, 0, -5]]
    assert_close(DenseRawAdvantage()(dense_batch(changed, group_size=2)), advantages)
    assert estimator.needs.dense is True


def test_dense_raw_last_step_is_sparse_with_group_std():
    torch.manual_seed(2)
    dense = torch.randn(8, 4)
    batch = RewardBatch(dense[:, 0], dense, 3, 4)
    sparse = SparseAdvantage(SparseAdvantage.Config(std="group"))(batch)
    assert_close(DenseRawAdvantage()(batch)[:, -1], sparse[:, -1])


# --- dense-return ---------------------------------------------------------------------


def test_dense_return_gamma_one_is_terminal_minus_current():
    # G_k = R_0 - R_t:  a: k=0 3 - 0 = 3, k=1 3 - 1 = 2;  b: k=0 2, k=1 2 - 3 = -1
    # k=0: [3, 2] -> mean 2.5, std .5;  k=1: [2, -1] -> mean .5, std 1.5
    advantages = DenseReturnAdvantage()(dense_batch(DENSE_ROWS, group_size=2))
    a, b = 0.5 / (0.5 + EPS), 1.5 / (1.5 + EPS)
    assert_close(advantages, expected([[a, b], [-a, -b], [0, 0], [0, 0]]))


def test_dense_return_discounted():
    # gamma = .5: G_1 = dR_1; G_0 = dR_0 + .5 dR_1: a: 1 + 1 = 2; b: 3 - .5 = 2.5
    # k=0: [2, 2.5] -> mean 2.25, std .25;  k=1: [2, -1] -> mean .5, std 1.5
    estimator = DenseReturnAdvantage(DenseReturnAdvantage.Config(gamma=0.5))
    advantages = estimator(dense_batch(DENSE_ROWS, group_size=2))
    a, b = 0.25 / (0.25 + EPS), 1.5 / (1.5 + EPS)
    assert_close(advantages, expected([[-a, b], [a, -b], [0, 0], [0, 0]]))


def test_dense_return_three_steps_by_hand():
    # row [R_0..R_3] = [7, 3, 1, 0]: gains by step k: [1, 2, 4]; gamma .5:
    # G_2 = 4, G_1 = 2 + .5 * 4 = 4, G_0 = 1 + .5 * 4 = 3
    gains = DenseRewards(torch.tensor([[7.0, 3.0, 1.0, 0.0]])).gains()
    torch.testing.assert_close(discounted_reward_to_go(gains, 0.5), torch.tensor([[3.0, 4.0, 4.0]], dtype=torch.float64))
    # against an all-zero partner: per step [G, 0] -> +-G/2 / (G/2 + 1e-4)
    advantages = DenseReturnAdvantage(DenseReturnAdvantage.Config(gamma=0.5))(
        dense_batch([[7, 3, 1, 0], [0, 0, 0, 0]], group_size=2)
    )
    a, b = 1.5 / (1.5 + EPS), 2 / (2 + EPS)
    assert_close(advantages, expected([[a, b, b], [-a, -b, -b]]))


def test_dense_return_limits_on_random_data():
    torch.manual_seed(3)
    dense = torch.randn(12, 6)
    batch = RewardBatch(dense[:, 0], dense, 5, 3)
    gamma_zero = DenseReturnAdvantage(DenseReturnAdvantage.Config(gamma=0.0))(batch)
    assert_close(gamma_zero, DenseAdvantage()(batch))
    # gamma = 1 normalises R_0 - R_t (t = T - k), written without any gains
    terminal_minus_current = dense[:, :1] - dense[:, 1:].flip(1)  # column k: R_0 - R_{T-k}
    manual = RewardBatch(dense[:, 0], None, 5, 3)
    gamma_one = DenseReturnAdvantage()(batch)
    for k in range(5):
        column = SparseAdvantage(SparseAdvantage.Config(std="group"))(
            RewardBatch(terminal_minus_current[:, k], None, 1, manual.group_size)
        )[:, 0]
        torch.testing.assert_close(gamma_one[:, k], column, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError):
        registry.load("advantages", "dense-return", {"gamma": 1.5})


# --- every estimator -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["sparse", "dense", "dense-raw", "dense-return"])
@pytest.mark.parametrize("num_steps,group_size", [(1, 2), (3, 3), (10, 4)])
def test_output_is_always_n_by_t_float32(name, num_steps, group_size):
    torch.manual_seed(num_steps)
    estimator = registry.load("advantages", name)
    assert isinstance(estimator, AdvantageEstimator)
    dense = torch.rand(2 * group_size, num_steps + 1)
    batch = RewardBatch(dense[:, 0], dense if estimator.needs.dense else None, num_steps, group_size)
    advantages = estimator(batch)
    assert advantages.shape == (2 * group_size, num_steps)
    assert advantages.dtype == torch.float32
    assert torch.isfinite(advantages).all()
    assert set(estimator.last_stats) >= {"nan_rewards", "zero_std_ratio"}


@pytest.mark.parametrize("name", ["dense", "dense-raw", "dense-return"])
def test_dense_estimators_reject_missing_dense(name):
    estimator = registry.load("advantages", name)
    with pytest.raises(ValueError, match="dense"):
        estimator(RewardBatch(torch.zeros(4), None, 3, 2))
    with pytest.raises(ValueError, match=r"\(N, T\+1\)"):
        estimator(RewardBatch(torch.zeros(4), torch.zeros(4, 3), 3, 2))


def test_group_size_must_divide_batch():
    with pytest.raises(ValueError, match="multiple of the group size"):
        SparseAdvantage()(RewardBatch(torch.zeros(5), None, 3, 2))


# --- multi-reward -----------------------------------------------------------------------


def test_combine_rewards_weighted_sum_before_normalisation():
    first = RewardBatch(torch.tensor([1.0, 2.0]), torch.tensor([[1.0, 0.0], [2.0, 1.0]]), 1, 2)
    second = RewardBatch(torch.tensor([10.0, NAN]), torch.tensor([[10.0, 4.0], [NAN, 2.0]]), 1, 2)
    combined = combine_rewards([first, second], [1.0, 0.5])
    # 1 + .5 * 10 = 6; second reward not applicable to sample 2 -> 2
    torch.testing.assert_close(combined.terminal, torch.tensor([6.0, 2.0]))
    torch.testing.assert_close(combined.dense, torch.tensor([[6.0, 2.0], [2.0, 2.0]]))
    assert (combined.num_steps, combined.group_size) == (1, 2)
    strict = combine_rewards([first, second], [1.0, 0.5], skip_nan=False)
    assert strict.terminal[0] == 6.0 and math.isnan(float(strict.terminal[1]))
    nothing = combine_rewards([sparse_batch([NAN], 1), sparse_batch([NAN], 1)], [1.0, 1.0])
    assert math.isnan(float(nothing.terminal[0]))


def test_combine_rewards_rejects_mismatches():
    base = sparse_batch([1.0, 2.0], 2)
    with pytest.raises(ValueError, match="one weight per"):
        combine_rewards([base, base], [1.0])
    with pytest.raises(ValueError, match="same batch"):
        combine_rewards([base, sparse_batch([1.0, 2.0, 3.0, 4.0], 2)], [1.0, 1.0])
    with pytest.raises(ValueError, match="dense"):
        combine_rewards([base, RewardBatch(base.terminal, torch.zeros(2, 4), 3, 2)], [1.0, 1.0])
    with pytest.raises(ValueError):
        combine_rewards([], [])


def test_combine_advantages_weighted_sum():
    first = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    second = torch.ones(2, 2)
    combined = combine_advantages([first, second], [2.0, -1.0])
    torch.testing.assert_close(combined, torch.tensor([[1.0, 3.0], [5.0, 7.0]]))
    with pytest.raises(ValueError, match="same"):
        combine_advantages([first, torch.ones(2, 3)], [1.0, 1.0])
