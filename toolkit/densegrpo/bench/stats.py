"""Per-run curves and the per-arm statistics over seeds that the report tabulates."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from scipy import stats as scipy_stats

from densegrpo.bench.arms import ARMS
from densegrpo.run.plots import moving_average

SMOOTH_WINDOW = 3  # iterations in the training reward's moving average: short enough for 8-iteration runs
SPARSE_ARM = "flow-grpo"  # the baseline whose final reward the other arms race to
CONFIDENCE = 0.95
DECISION_HALF_WIDTH = 0.02  # an undecided claim whose interval is this narrow is a tie at the benchmark's resolution

# The paper's claims as (claim, arm a, arm b): each holds when arm a beats arm b. Every pair
# differs in one component only: gain > raw compares the two with the uniform calibrator.
CLAIMS = [
    ("dense > sparse", "densegrpo", "flow-grpo"),
    ("calibrated > uniform", "densegrpo", "dense-uniform"),
    ("n = t > n = 2", "densegrpo", "dense-n2"),
    ("n = 2 > n = 1", "dense-n2", "dense-n1"),
    ("gain > raw", "dense-uniform", "dense-raw"),
]
# The budgets a claim is judged at, and the per-run number compared there. Every arm trains on
# the same batch, so equal iterations are also equal training samples.
BUDGETS = [
    ("equal iterations (= equal samples): held-out ODE reward after training", "eval_final"),
    ("equal iterations (= equal samples): training reward, last 3 iterations", "final_reward"),
    ("equal wall-clock: training reward at the shortest run's time", "reward_at_wall"),
    ("equal NFE: training reward at the smallest run's NFE", "reward_at_nfe"),
]


def summarise_run(rows: list[dict[str, Any]], summary: dict[str, Any], seed: int) -> dict[str, Any]:
    """One run's curves (lists of length ``I``, one entry per iteration) and scalars, from its
    ``I`` metrics rows and the summary ``run_training`` returned; ``seed`` pairs it with the
    other arms' runs of that seed."""
    reward = np.array([r["reward_mean"] for r in rows], dtype=float)
    return {
        "seed": seed,
        "iteration": [r["iteration"] + 1 for r in rows],
        "reward": reward.tolist(),
        "reward_smooth": moving_average(reward, SMOOTH_WINDOW).tolist(),
        "wall_s": [r["wall_s"] for r in rows],
        "nfe_total": [r["nfe_total"] for r in rows],
        "iteration_s": [r["iteration_s"] for r in rows],
        "nfe_rollout": float(np.mean([r["nfe_rollout"] for r in rows])),
        "nfe_dense": float(np.mean([r["nfe_dense"] for r in rows])),
        "nfe_train": float(np.mean([r["nfe_train"] for r in rows])),
        "nfe_calibration": float(summary.get("nfe_calibration", 0)),
        "calibration_s": float(rows[0]["wall_s"] - rows[0]["iteration_s"]),
        "eval_base": summary.get("eval_reward_base"),
        "eval_final": summary.get("eval_reward_final"),
        "final_reward": float(np.mean(reward[-3:])),
    }


def difference_interval(a: list[float], b: list[float], paired: bool, confidence: float = CONFIDENCE) -> dict[str, Any]:
    """Mean of ``a`` minus mean of ``b`` with its Student-t confidence interval.

    ``paired``: ``a[i]`` and ``b[i]`` share seed ``i`` (same prompts and noise), so the interval
    is the one-sample t interval of the differences ``a[i] - b[i]``. Otherwise Welch's
    interval for two independent samples. NaN or ``None`` entries are left out (with their
    partner, when paired). Returns ``{"difference", "low", "high", "half_width", "n", "paired"}``;
    the bounds are NaN when there are too few values for an interval.
    """
    def ok(v: float | None) -> bool:
        return v is not None and not math.isnan(v)

    level = 0.5 + confidence / 2
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
        d = np.array([x - y for x, y in zip(a, b) if ok(x) and ok(y)], dtype=float)
        n = int(d.size)
        diff = float(d.mean()) if n else float("nan")
        half = float(scipy_stats.t.ppf(level, n - 1) * d.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    else:
        xa = np.array([x for x in a if ok(x)], dtype=float)
        xb = np.array([x for x in b if ok(x)], dtype=float)
        n = int(min(xa.size, xb.size))
        diff = float(xa.mean() - xb.mean()) if xa.size and xb.size else float("nan")
        if xa.size > 1 and xb.size > 1:
            va, vb = xa.var(ddof=1) / xa.size, xb.var(ddof=1) / xb.size
            se = math.sqrt(va + vb)
            dof = (va + vb) ** 2 / (va**2 / (xa.size - 1) + vb**2 / (xb.size - 1)) if se > 0 else float(xa.size + xb.size - 2)
            half = float(scipy_stats.t.ppf(level, dof) * se)
        else:
            half = float("nan")
    return {"difference": diff, "low": diff - half, "high": diff + half, "half_width": half, "n": n, "paired": paired}


def verdict(interval: dict[str, Any], half_width: float = DECISION_HALF_WIDTH) -> str:
    """``holds`` when the interval lies above 0, ``fails`` when below, otherwise ``undecided``;
    an undecided interval no wider than ``half_width`` each side is ``tie`` (the arms differ by
    less than the benchmark resolves)."""
    if math.isnan(interval["half_width"]):
        return "undecided"
    if interval["low"] > 0:
        return "holds"
    if interval["high"] < 0:
        return "fails"
    return "tie" if interval["half_width"] <= half_width else "undecided"


def judge_claims(per_run: dict[str, dict[str, list[float | None]]], seeds: dict[str, list[int]]) -> list[dict[str, Any]]:
    """Every claim of :data:`CLAIMS` whose two arms ran, at every budget of :data:`BUDGETS`;
    a user's arm (not in :data:`~densegrpo.bench.arms.ARMS`) is claimed to beat Flow-GRPO and DenseGRPO.

    ``per_run[arm][key]``: one number per run of ``arm``; ``seeds[arm]``: their seeds. Arms
    that ran the same seeds are paired by seed.
    """
    judged = []
    yours = [arm for arm in per_run if arm not in ARMS]
    extra = [(f"{arm} > {rival}", arm, rival) for arm in yours for rival in ("flow-grpo", "densegrpo")]
    for claim, a, b in CLAIMS + extra:
        if a not in per_run or b not in per_run:
            continue
        shared = sorted(set(seeds[a]) & set(seeds[b]))
        paired = len(shared) > 1
        for budget, key in BUDGETS:
            if paired:
                xa = [per_run[a][key][seeds[a].index(s)] for s in shared]
                xb = [per_run[b][key][seeds[b].index(s)] for s in shared]
            else:
                xa, xb = per_run[a][key], per_run[b][key]
            interval = difference_interval(xa, xb, paired)
            judged.append({"claim": claim, "a": a, "b": b, "budget": budget, "key": key, **interval, "verdict": verdict(interval)})
    return judged


def mean_std(values: list[float | None]) -> tuple[float, float]:
    """Mean and population std of the values that are neither ``None`` nor NaN (NaN, NaN if none)."""
    array = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=0))


def value_at(x: np.ndarray, y: np.ndarray, at: float) -> float:
    """``y (L,)`` against increasing ``x (L,)``, interpolated at ``at``; NaN before ``x[0]``."""
    if at < x[0]:
        return float("nan")
    return float(np.interp(at, x, y))


def first_reach(curve: list[float], target: float) -> int | None:
    """The 1-based iteration at which ``curve`` first reaches ``target``, or ``None``."""
    for index, value in enumerate(curve):
        if value >= target - 1e-12:
            return index + 1
    return None


def per_run_numbers(runs: list[dict[str, Any]], wall_budget: float, nfe_budget: float) -> dict[str, list[float | None]]:
    """The numbers of :data:`BUDGETS`, one per run of one arm."""
    return {
        "eval_final": [r["eval_final"] for r in runs],
        "final_reward": [r["final_reward"] for r in runs],
        "reward_at_wall": [value_at(np.array(r["wall_s"]), np.array(r["reward_smooth"]), wall_budget) for r in runs],
        "reward_at_nfe": [value_at(np.array(r["nfe_total"], dtype=float), np.array(r["reward_smooth"]), nfe_budget) for r in runs],
    }


def summarise_arm(runs: list[dict[str, Any]], wall_budget: float, nfe_budget: float) -> dict[str, Any]:
    """Statistics over the seeds of one arm: ``(mean, std)`` pairs, per-iteration costs, and
    ``mean_curve`` (``I`` entries), the smoothed reward averaged over seeds."""
    return {
        "final_reward": mean_std([r["final_reward"] for r in runs]),
        "eval_final": mean_std([r["eval_final"] for r in runs]),
        "eval_base": mean_std([r["eval_base"] for r in runs]),
        "reward_at_wall": mean_std([value_at(np.array(r["wall_s"]), np.array(r["reward_smooth"]), wall_budget) for r in runs]),
        "reward_at_nfe": mean_std([value_at(np.array(r["nfe_total"], dtype=float), np.array(r["reward_smooth"]), nfe_budget) for r in runs]),
        "iteration_s": mean_std([float(np.mean(r["iteration_s"])) for r in runs]),
        "nfe_rollout": runs[0]["nfe_rollout"],
        "nfe_dense": runs[0]["nfe_dense"],
        "nfe_train": runs[0]["nfe_train"],
        "nfe_calibration": runs[0]["nfe_calibration"],
        "mean_curve": np.mean([r["reward_smooth"] for r in runs], axis=0).tolist(),
    }


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    """Per reward: the equal wall-clock and NFE budgets (the shortest run's) and every arm's
    statistics, with the iterations each arm takes to reach the sparse arm's final reward."""
    summary: dict[str, Any] = {}
    for reward, arms in results["runs"].items():
        wall_budget = min(min(run["wall_s"][-1] for run in runs) for runs in arms.values())
        nfe_budget = min(min(run["nfe_total"][-1] for run in runs) for runs in arms.values())
        rows = {arm: summarise_arm(runs, wall_budget, nfe_budget) for arm, runs in arms.items()}
        if SPARSE_ARM in rows:
            target = rows[SPARSE_ARM]["mean_curve"][-1]
            sparse_iters = first_reach(rows[SPARSE_ARM]["mean_curve"], target)
            for row in rows.values():
                reached = first_reach(row["mean_curve"], target)
                row["iterations_to_sparse_final"] = reached
                row["iterations_ratio"] = (reached / sparse_iters) if (reached and sparse_iters) else None
        per_run = {arm: per_run_numbers(runs, wall_budget, nfe_budget) for arm, runs in arms.items()}
        seeds = {arm: [int(r.get("seed", i)) for i, r in enumerate(runs)] for arm, runs in arms.items()}
        summary[reward] = {"wall_budget_s": wall_budget, "nfe_budget": nfe_budget, "arms": rows,
                           "claims": judge_claims(per_run, seeds)}
    return summary
