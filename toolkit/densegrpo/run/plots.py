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
from matplotlib.ticker import MaxNLocator  # noqa: E402

from densegrpo.run.monitors import logged_monitors  # noqa: E402


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
    monitors = logged_monitors(rows)
    if monitors:  # a second panel: monitors have scales of their own
        fig, (ax, watch) = plt.subplots(2, 1, figsize=(7, 7), sharex=True, gridspec_kw={"height_ratios": [3, 2]})
        _plot_monitors(watch, rows, monitors)
    else:
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
    ax.set_ylabel("reward")
    ax.grid(alpha=0.3)
    ax.set_title("GRPO reward")
    if monitors:
        ax.legend(fontsize="small", loc="best")
    else:
        ax.set_xlabel("iteration")
        ax.legend(fontsize="small", loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)  # below: never over a curve
    return save_figure(fig, path)


def _plot_monitors(ax: Any, rows: list[dict[str, Any]], labels: list[str]) -> None:
    """Each monitor reward at every evaluation (the base at iteration 0), with the paired standard
    error of its gain, and a red band at each evaluation that warned of reward hacking."""
    cmap = plt.get_cmap("tab10")
    for i, label in enumerate(labels):
        points = _eval_points(rows, f"monitor_{label}")
        if not points:
            continue
        xs, ys, se = zip(*points)
        yerr = [v if math.isfinite(v) else 0.0 for v in se]
        ax.errorbar(xs, ys, yerr=yerr, fmt="o-", color=cmap((i + 4) % 10), capsize=3, label=f"monitor {label}")
    warned = [r["iteration"] + 1 for r in rows if r.get("reward_hacking")]
    for k, x in enumerate(warned):
        ax.axvline(x, color="red", alpha=0.35, linewidth=6, label="reward-hacking warning" if k == 0 else None)
    ax.set_xlabel("iteration")
    ax.set_ylabel("monitor reward")
    ax.set_title("Monitor rewards (ODE eval, never trained on; ± paired standard error of the gain)", fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="best")


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


STEP_PANELS = (
    ("dense_gain_mean", "dense gain mean  dR_k"),
    ("dense_gain_pos_frac", "share of positive gains"),
    ("noise_level", "noise level  psi_k"),
    ("grad_norm_per_step", "gradient norm of step k's loss"),
    ("clipfrac_per_step", "clip fraction"),
)
"""Per-step metrics (lists ``(T,)`` in metrics.jsonl) the diagnostics page draws, with their titles."""


def step_windows(rows: list[dict[str, Any]], ends: list[int] | None = None) -> list[tuple[int, int, list[dict[str, Any]]]]:
    """The rows cut at the evaluations: ``(first, last, rows)`` per window, one window ending at
    each row that logged ``eval_reward`` (and one at the last row); ``ends`` overrides the cuts."""
    if ends is None:
        ends = [i for i, r in enumerate(rows) if "eval_reward" in r]
    if not ends or ends[-1] != len(rows) - 1:
        ends = [*ends, len(rows) - 1]
    windows, start = [], 0
    for end in ends:
        if end >= start:
            windows.append((rows[start]["iteration"], rows[end]["iteration"], rows[start : end + 1]))
            start = end + 1
    return windows


def _step_mean(rows: list[dict[str, Any]], key: str) -> np.ndarray | None:
    """Mean over ``rows`` of the per-step list ``key`` ``(T,)`` (NaN where no row has a value)."""
    lists = [r[key] for r in rows if isinstance(r.get(key), list)]
    if not lists:
        return None
    width = max(len(v) for v in lists)
    values = np.full((len(lists), width), np.nan)
    for i, v in enumerate(lists):
        values[i, : len(v)] = [np.nan if x is None else x for x in v]
    with np.errstate(all="ignore"):
        finite = np.isfinite(values)
        total = np.where(finite, values, 0.0).sum(0)
        count = finite.sum(0)
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def plot_step_diagnostics(rows: list[dict[str, Any]], path: Path, max_lines: int = 8) -> Path:
    """One panel per metric of :data:`STEP_PANELS` against the step index k (0 = pure noise):
    each line is its mean over one evaluation window (:func:`step_windows`), coloured from the
    first window (dark) to the latest (bright); at most ``max_lines`` windows, the latest kept.
    A metric the rows do not log (a sparse run has no dense gains) leaves its panel empty, saying so."""
    windows = step_windows(rows)
    if len(windows) > max_lines:  # keep the first and the most recent ones
        windows = [windows[0], *windows[-(max_lines - 1):]]
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.5))
    cmap = plt.get_cmap("viridis")
    for ax, (key, title) in zip(axes.flat, STEP_PANELS):
        drawn = False
        for i, (first, last, chunk) in enumerate(windows):
            values = _step_mean(chunk, key)
            if values is None or not np.isfinite(values).any():
                continue
            color = cmap(i / max(len(windows) - 1, 1))
            ax.plot(np.arange(len(values)), values, "o-", color=color, markersize=3, label=f"it {first + 1}-{last + 1}")
            drawn = True
        if key == "dense_gain_mean" and drawn:
            ax.axhline(0.0, color="black", linewidth=0.8)
        if not drawn:
            ax.text(0.5, 0.5, f"{key}: not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title, fontsize="medium")
        ax.set_xlabel("step k")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    legend_ax = axes.flat[-1]
    legend_ax.axis("off")
    handles, labels = next(((a.get_legend_handles_labels()) for a in axes.flat if a.get_legend_handles_labels()[0]), ([], []))
    if handles:
        legend_ax.legend(handles, labels, title="iterations (mean per window)", loc="center", fontsize="small")
    fig.suptitle("Per-step diagnostics")
    fig.tight_layout()
    return save_figure(fig, path)
