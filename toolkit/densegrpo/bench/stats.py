"""Per-run curves and the per-arm statistics over seeds that the report tabulates."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from densegrpo.plots import moving_average

SMOOTH_WINDOW = 3  # iterations in the training reward's moving average: short enough for 8-iteration runs
SPARSE_ARM = "flow-grpo"  # the baseline whose final reward the other arms race to


def summarise_run(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    """One run's curves (lists of length ``I``, one entry per iteration) and scalars, from its
    ``I`` metrics rows and the summary ``run_training`` returned."""
    reward = np.array([r["reward_mean"] for r in rows], dtype=float)
    return {
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
        summary[reward] = {"wall_budget_s": wall_budget, "nfe_budget": nfe_budget, "arms": rows}
    return summary
