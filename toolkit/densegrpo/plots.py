"""PNG plots for runs: reward curves and calibrated noise levels (matplotlib, Agg)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)
    return path


def moving_average(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing mean over the last ``window`` values (fewer at the start), NaN-aware."""
    out = np.full(len(values), np.nan)
    for i in range(len(values)):
        chunk = values[max(0, i + 1 - window) : i + 1]
        if np.isfinite(chunk).any():
            out[i] = np.nanmean(chunk)
    return out


def plot_reward_curve(rows: list[dict[str, Any]], path: Path, window: int = 10) -> Path:
    """Training reward (per iteration and its ``window``-iteration moving average) and ODE
    evaluation reward against iteration, with error bars of the paired standard error of its
    gain over the base (``eval_gain_se``) when the rows have it. The spread of single samples
    (``reward_std``) is left out: it is as wide as the reward's range and would hide the trend
    of the mean."""
    iterations = np.array([r["iteration"] + 1 for r in rows])
    mean = np.array([r["reward_mean"] for r in rows], dtype=float)
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(iterations, mean, label="train reward (SDE rollouts)", color="tab:blue", alpha=0.45, linewidth=1)
    if len(rows) >= 2:
        ax.plot(iterations, moving_average(mean, window), color="tab:blue", linewidth=2.2,
                label=f"train reward, mean of the last {window} iterations")
    evals = [(r["iteration"] + 1, r["eval_reward"], r.get("eval_gain_se", math.nan)) for r in rows if "eval_reward" in r]
    base = [r["eval_reward_base"] for r in rows if "eval_reward_base" in r]
    if base:
        evals = [(0, base[0], 0.0)] + evals
        ax.axhline(base[0], color="tab:red", linestyle=":", linewidth=1, alpha=0.7, label="eval reward of the base policy")
    if evals:
        xs, ys, se = zip(*evals)
        if all(math.isfinite(v) for v in se):
            ax.errorbar(xs, ys, yerr=se, fmt="o-", color="tab:red", capsize=3,
                        label="eval reward (ODE, test prompts), ± paired standard error of its gain")
        else:
            ax.plot(xs, ys, "o-", color="tab:red", label="eval reward (ODE, test prompts)")
    trained = [(r["iteration"] + 1, r["train_eval_reward"], r.get("train_eval_gain_se", math.nan)) for r in rows if "train_eval_reward" in r]
    trained_base = [r["train_eval_reward_base"] for r in rows if "train_eval_reward_base" in r]
    if trained:
        if trained_base:
            trained = [(0, trained_base[0], 0.0)] + trained
        xs, ys, se = zip(*trained)
        ax.errorbar(xs, ys, yerr=[v if math.isfinite(v) else 0.0 for v in se], fmt="s--", color="tab:green", capsize=3,
                    label="eval reward (ODE, training prompts), ± paired standard error of its gain")
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)  # below: never over a curve
    ax.set_title("GRPO reward")
    return _save(fig, path)


def plot_calibration(history: list[dict[str, Any]], path: Path, uniform: float | None = None) -> Path:
    """psi(t) per calibration round against the uniform noise level."""
    fig, ax = plt.subplots(figsize=(7, 4))
    count = len(history)
    cmap = plt.get_cmap("viridis")
    for i, entry in enumerate(history):
        psi = entry["noise_level_next"]
        ax.plot(range(len(psi)), psi, color=cmap(i / max(count - 1, 1)), alpha=0.8, label=f"round {entry['round'] + 1}" if i in {0, count - 1} else None)
    if uniform is not None and history:
        ax.axhline(uniform, color="black", linestyle="--", label=f"uniform a = {uniform:g}")
    ax.set_xlabel("step index k (0 = pure noise)")
    ax.set_ylabel("noise level psi")
    ax.set_title("Reward-aware calibration (DenseGRPO Algorithm 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
