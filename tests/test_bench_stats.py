"""The benchmark's statistics on hand cases: known differences give known intervals and verdicts."""

from __future__ import annotations

import math

import pytest
from densegrpo.bench.stats import (
    BUDGETS,
    CLAIMS,
    difference_interval,
    judge_claims,
    verdict,
)
from scipy import stats as scipy_stats

A = [0.5, 0.7, 0.6, 0.9, 0.4]
B = [0.4, 0.4, 0.4, 0.5, 0.4]  # a - b = 0.1, 0.3, 0.2, 0.4, 0.0


def test_paired_interval_of_a_hand_case():
    # differences mean 0.2, sample std sqrt(0.1 / 4); t(0.975, 4 dof) = 2.776 from any t table
    interval = difference_interval(A, B, paired=True)
    half = 2.776445105 * math.sqrt(0.1 / 4) / math.sqrt(5)
    assert interval["difference"] == pytest.approx(0.2)
    assert interval["half_width"] == pytest.approx(half, rel=1e-6)
    assert (interval["low"], interval["high"]) == pytest.approx((0.2 - half, 0.2 + half))
    assert interval["n"] == 5 and interval["paired"]


def test_paired_and_welch_intervals_agree_with_scipys_t_tests():
    paired = scipy_stats.ttest_rel(A, B).confidence_interval(0.95)
    welch = scipy_stats.ttest_ind(A, B, equal_var=False).confidence_interval(0.95)
    ours_paired, ours_welch = difference_interval(A, B, paired=True), difference_interval(A, B, paired=False)
    assert (ours_paired["low"], ours_paired["high"]) == pytest.approx((paired.low, paired.high), rel=1e-9)
    assert (ours_welch["low"], ours_welch["high"]) == pytest.approx((welch.low, welch.high), rel=1e-9)


def test_pairing_by_seed_removes_the_seed_to_seed_spread():
    # each seed shifts both arms alike; a beats b by exactly 0.01 +- 0.001 within every seed
    base = [0.1, 0.5, 0.9, 0.3, 0.7]
    a = [x + 0.01 + e for x, e in zip(base, [0.001, -0.001, 0.0, 0.0005, -0.0005])]
    paired, unpaired = difference_interval(a, base, paired=True), difference_interval(a, base, paired=False)
    assert verdict(paired) == "holds" and paired["half_width"] < 0.002
    assert verdict(unpaired) == "undecided" and unpaired["half_width"] > 0.2


def test_nan_runs_are_left_out_with_their_partner():
    interval = difference_interval([*A, float("nan")], [*B, 0.3], paired=True)
    assert interval["n"] == 5 and interval["difference"] == pytest.approx(0.2)


@pytest.mark.parametrize(
    "low,high,said",
    [(0.01, 0.05, "holds"), (-0.05, -0.01, "fails"), (-0.01, 0.03, "tie"), (-0.1, 0.2, "undecided")],
)
def test_verdicts(low, high, said):
    interval = {"difference": (low + high) / 2, "low": low, "high": high, "half_width": (high - low) / 2}
    assert verdict(interval, half_width=0.02) == said


def test_one_seed_gives_no_interval_and_no_verdict():
    interval = difference_interval([0.5], [0.4], paired=True)
    assert interval["difference"] == pytest.approx(0.1) and math.isnan(interval["half_width"])
    assert verdict(interval) == "undecided"


def test_claims_pair_runs_by_their_seeds_not_their_order():
    keys = [key for _, key in BUDGETS]
    per_run = {
        "densegrpo": {key: [0.6, 0.8, 0.7] for key in keys},  # seeds 2, 0, 1
        "flow-grpo": {key: [0.5, 0.6, 0.7] for key in keys},  # seeds 0, 1, 2
    }
    seeds = {"densegrpo": [2, 0, 1], "flow-grpo": [0, 1, 2]}
    judged = judge_claims(per_run, seeds)
    assert {row["claim"] for row in judged} == {"dense > sparse"}
    assert len(judged) == len(BUDGETS) and len(CLAIMS) == 5
    for row in judged:  # by seed: 0.8 - 0.5, 0.7 - 0.6, 0.6 - 0.7
        assert row["paired"] and row["difference"] == pytest.approx(0.1)
        expected = scipy_stats.ttest_rel([0.8, 0.7, 0.6], [0.5, 0.6, 0.7]).confidence_interval(0.95)
        assert (row["low"], row["high"]) == pytest.approx((expected.low, expected.high))
