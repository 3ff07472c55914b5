"""PNG plots for runs: reward curves and calibrated noise levels (matplotlib, Agg), and the
drawing helpers the benchmark report shares with them."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(fig: Any, path: Path, dpi: int = 120, bbox_inches: str | None = "tight") -> Path:
    """Write ``fig`` to ``path`` through a temporary file (a reader never sees half a PNG) and
    close it. ``bbox_inches=None`` keeps the figure's own size (for a ``tight_layout`` figure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi, bbox_inches=bbox_inches)
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


def mean_std_band(ax: Any, xs: list[np.ndarray], ys: list[np.ndarray], label: str, color: Any, points: int = 50) -> None:
    """Mean +- std over runs of curves ``ys[i]`` against ``xs[i]`` (each ``(L_i,)``, increasing),
    drawn on the ``points`` grid where every run has data (interpolated)."""
    grid = np.linspace(max(x[0] for x in xs), min(x[-1] for x in xs), points)
    values = np.array([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    mean, std = values.mean(0), values.std(0)
    ax.plot(grid, mean, label=label, color=color)
    ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15)


def uniform_line(ax: Any, level: float) -> None:
    """The uniform noise level ``a`` a calibrated psi(t) is compared against."""
    ax.axhline(level, color="black", linestyle="--", label=f"uniform a = {level:g}")


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
    base = next((r["eval_reward_base"] for r in rows if "eval_reward_base" in r), None)
    if base is not None:
        ax.axhline(base, color="tab:red", linestyle=":", linewidth=1, alpha=0.7, label="eval reward of the base policy")
    for prefix, prompts, style, color in (("eval", "test", "o-", "tab:red"), ("train_eval", "training", "s--", "tab:green")):
        points = _eval_points(rows, prefix)
        if not points:
            continue
        xs, ys, se = zip(*points)
        label = f"eval reward (ODE, {prompts} prompts)"
        if all(math.isfinite(v) for v in se):
            ax.errorbar(xs, ys, yerr=se, fmt=style, color=color, capsize=3, label=f"{label}, ± paired standard error of its gain")
        else:
            ax.plot(xs, ys, style, color=color, label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)  # below: never over a curve
    ax.set_title("GRPO reward")
    return save_figure(fig, path)


def _eval_points(rows: list[dict[str, Any]], prefix: str) -> list[tuple[int, float, float]]:
    """``(iteration, reward, gain standard error)`` of evaluation ``prefix`` (``eval`` or
    ``train_eval``), led by the base policy at iteration 0 (standard error 0) when logged."""
    points = [(r["iteration"] + 1, r[f"{prefix}_reward"], r.get(f"{prefix}_gain_se", math.nan)) for r in rows if f"{prefix}_reward" in r]
    base = next((r[f"{prefix}_reward_base"] for r in rows if f"{prefix}_reward_base" in r), None)
    return ([(0, base, 0.0)] if base is not None else []) + points


def plot_calibration(history: list[dict[str, Any]], path: Path, uniform: float | None = None) -> Path:
    """psi(t) per calibration round against the uniform noise level."""
    fig, ax = plt.subplots(figsize=(7, 4))
    count = len(history)
    cmap = plt.get_cmap("viridis")
    for i, entry in enumerate(history):
        psi = entry["noise_level_next"]
        ax.plot(range(len(psi)), psi, color=cmap(i / max(count - 1, 1)), alpha=0.8, label=f"round {entry['round'] + 1}" if i in {0, count - 1} else None)
    if uniform is not None and history:
        uniform_line(ax, uniform)
    ax.set_xlabel("step index k (0 = pure noise)")
    ax.set_ylabel("noise level psi")
    ax.set_title("Reward-aware calibration (DenseGRPO Algorithm 1)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)
