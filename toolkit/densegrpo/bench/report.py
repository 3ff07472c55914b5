"""``report.md`` and the PNG curves of a benchmark, drawn from its ``results.json``."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np

from densegrpo.bench.stats import DECISION_HALF_WIDTH, SMOOTH_WINDOW
from densegrpo.run import plots

PAPER_COST_RATIO = 19.0 / 11.0  # DenseGRPO paper: 19 vs 11 GPU-hours per 20 steps, n = t vs n = 1
PSI_ARM = "densegrpo"  # the arm whose calibrated psi(t) is drawn
DPI = 110  # with tight_layout and no bbox cropping: the committed PNGs re-render byte for byte
CURVE_AXES = [("iteration", "iteration"), ("nfe_total", "NFE (velocity evaluations, all phases)"), ("wall_s", "wall-clock training seconds")]


def fmt(pair: tuple[float, float], digits: int = 3) -> str:
    """``mean ± std``, or ``n/a`` for a NaN mean."""
    mean, std = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def plot_curves(results: dict[str, Any], out: Path) -> None:
    """``reward_vs_{iteration,nfe,wall}.png``: each arm's smoothed training reward, mean ± std
    over seeds, against iteration, NFE and wall-clock; one panel per reward."""
    rewards = list(results["runs"])
    cmap = plt.get_cmap("tab10")
    for key, label in CURVE_AXES:
        fig, axes = plt.subplots(1, len(rewards), figsize=(6.5 * len(rewards), 4.2), squeeze=False)
        for ax, reward in zip(axes[0], rewards):
            for index, (arm, runs) in enumerate(results["runs"][reward].items()):
                xs = [np.array(r[key], dtype=float) for r in runs]
                ys = [np.array(r["reward_smooth"], dtype=float) for r in runs]
                plots.mean_std_band(ax, xs, ys, arm, cmap(index % 10))
            ax.set_title(f"{reward}: training reward vs {label.split(' (')[0]}")
            ax.set_xlabel(label)
            ax.set_ylabel(f"reward ({SMOOTH_WINDOW}-iteration moving average)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        plots.save_figure(fig, out / f"reward_vs_{key.replace('_total', '').replace('_s', '')}.png", dpi=DPI, bbox_inches=None)


def plot_psi(out: Path, rewards: list[str], uniform: float) -> None:
    """``psi.png``: the last calibrated psi(t) ``(T,)`` of every seed of :data:`PSI_ARM`, read
    from ``out/runs/REWARD/ARM/seed*/calibration.jsonl``, against the uniform level ``uniform``."""
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for reward in rewards:
        for seed_dir in sorted((out / "runs" / re.sub(r"[^A-Za-z0-9._+-]", "_", reward) / PSI_ARM).glob("seed*")):
            path = seed_dir / "calibration.jsonl"
            if not path.exists():
                continue
            rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if rounds:
                psi = rounds[-1]["noise_level_next"]
                ax.plot(range(len(psi)), psi, marker="o", alpha=0.7, label=f"{reward} {seed_dir.name}")
                drawn = True
    plots.uniform_line(ax, uniform)
    ax.set_xlabel("step index k (0 = pure noise)")
    ax.set_ylabel("noise level")
    ax.set_title("Calibrated psi(t) (DenseGRPO Algorithm 1) vs uniform")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    plots.save_figure(fig, out / "psi.png", dpi=DPI, bbox_inches=None)


def world_title(results: dict[str, Any]) -> str:
    world = results.get("world", "toy")
    return {"toy": "the toy world", "lab": "the credit-assignment lab"}.get(world, f"`{world}`")


def render_report(results: dict[str, Any]) -> str:
    """The markdown report: how it was made, the plots, and per reward a table of every arm,
    the claims checked and the measured costs."""
    steps = f" ({results['eval_steps']} steps)" if results.get("eval_steps") else ""
    lines = [
        f"# Sparse vs dense GRPO on {world_title(results)}",
        "",
        f"Produced by `{results['command']}` on {results['date']} ({results['machine']}); profile `{results['profile']}`, "
        f"{results['iterations']} iterations, {results['seeds']} seeds per arm, batch {results['group_size']} x {results['groups_per_iteration']} groups. "
        "Every number below was computed by the command; nothing is typed by hand.",
        "",
        f"Reward = the terminal reward of the training rollouts (SDE), {SMOOTH_WINDOW}-iteration moving average; eval = ODE samples{steps} on test prompts after training. "
        "Wall-clock counts training compute only (calibration, rollouts, rewards, updates), not evaluation.",
        "",
        "![reward vs iteration](reward_vs_iteration.png)",
        "![reward vs NFE](reward_vs_nfe.png)",
        "![reward vs wall-clock](reward_vs_wall.png)",
        "![psi](psi.png)",
        "",
    ]
    lines += [HOW_TO_READ.format(half=DECISION_HALF_WIDTH), ""]
    for reward, block in results["summary"].items():
        lines += arm_table(reward, block)
        lines += claims(block)
        cost = results["costs"].get(reward)
        if cost:
            lines += cost_section(cost, block)
    return "\n".join(lines) + "\n"


def arm_table(reward: str, block: dict[str, Any]) -> list[str]:
    """The budgets and one table row per arm of ``reward``'s summary ``block``."""
    lines = [
        f"## {reward}",
        "",
        f"Equal wall-clock budget: {block['wall_budget_s']:.1f} s; equal NFE budget: {block['nfe_budget']:.0f}.",
        "",
        "| arm | final reward | eval (ODE) base -> final | reward @ equal wall | reward @ equal NFE | s / iteration | NFE / iteration rollout + dense + train | calibration NFE | iterations to sparse final (ratio) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, row in block["arms"].items():
        ratio = row.get("iterations_ratio")
        reach = row.get("iterations_to_sparse_final")
        lines.append(
            f"| {arm} | {fmt(row['final_reward'])} | {fmt(row['eval_base'])} -> {fmt(row['eval_final'])} | {fmt(row['reward_at_wall'])} | "
            f"{fmt(row['reward_at_nfe'])} | {fmt(row['iteration_s'], 2)} | {row['nfe_rollout']:.0f} + {row['nfe_dense']:.0f} + {row['nfe_train']:.0f} | "
            f"{row['nfe_calibration']:.0f} | {reach if reach else 'not reached'}{f' ({ratio:.2f}x)' if ratio else ''} |"
        )
    lines.append("")
    return lines


HOW_TO_READ = (
    "How to read the claims: each row is arm a minus arm b on one number, its mean over seeds with a 95% "
    "Student-t confidence interval; arms that ran the same seeds (same prompts and noise) are paired by seed, so "
    "the interval is that of the per-seed differences. **holds**: the whole interval lies above 0; **fails**: "
    "below 0; **tie**: it straddles 0 with a half-width of at most {half:.2f}, so any difference is smaller than "
    "this benchmark resolves; **undecided**: it straddles 0 and is wider, so more seeds are needed. With 4 budgets "
    "and 5 claims, about one interval in twenty misses its true value by chance alone."
)


def claims(block: dict[str, Any]) -> list[str]:
    """The paper's claims with their paired confidence intervals and verdicts (one reward's
    summary ``block``), and the iterations-to-sparse-final ratio."""
    arms = block["arms"]
    out = ["Claims checked (measured, not assumed):", "",
           "| claim | a - b | budget | difference [95% CI] | half-width | seeds | verdict |", "|---|---|---|---|---|---|---|"]
    for row in block.get("claims", []):
        interval = "n/a" if math.isnan(row["difference"]) else (
            f"{row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}]" if not math.isnan(row["half_width"]) else f"{row['difference']:+.3f}")
        out.append(f"| {row['claim']} | {row['a']} - {row['b']} | {row['budget']} | {interval} | "
                   f"{row['half_width']:.3f} | {row['n']}{' paired' if row['paired'] else ''} | **{row['verdict']}** |")
    out.append("")
    if "densegrpo" in arms and "flow-grpo" in arms:
        ratio = arms["densegrpo"].get("iterations_ratio")
        curve = arms["flow-grpo"]["mean_curve"]
        degenerate = len(curve) > 1 and curve[-1] <= curve[0]
        out.append(
            f"- Dense reaches sparse's final reward (seed-mean curves) in <= 0.6x the iterations: {'yes' if ratio and ratio <= 0.6 else 'no'} "
            f"(ratio {f'{ratio:.2f}' if ratio is not None else 'not reached'})"
            + ("; degenerate here: sparse's final reward is not above its first iteration's, so every arm 'reaches' it at once." if degenerate else ".")
        )
    out.append("- 'n/a' at equal NFE: the arm's calibration plus first iteration already exceed the budget.")
    out.append("")
    return out


def cost_section(cost: dict[str, Any], block: dict[str, Any]) -> list[str]:
    """The measured costs (``measure_costs``) of one reward, with the measured dense / sparse
    time per iteration of its summary ``block``."""
    arms = block["arms"]
    measured = None
    if "densegrpo" in arms and "flow-grpo" in arms:
        measured = arms["dense-uniform" if "dense-uniform" in arms else "densegrpo"]["iteration_s"][0] / arms["flow-grpo"]["iteration_s"][0]
    return [
        f"Cost (batch {cost['batch']}, T = {cost['num_steps']}):",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| dense (n = t) / sparse time per iteration, measured in this run | {measured:.2f}x |" if measured else "| dense / sparse per iteration | n/a |",
        f"| same ratio, estimated from NFE counts priced at batch-{cost['batch']} forward/backward/reward costs | {cost['floor_ratio']:.2f}x |",
        f"| paper's implied ratio (19 / 11 GPU-hours, n = t vs n = 1) | {PAPER_COST_RATIO:.2f}x |",
        f"| dense engine batched+reuse vs naive | {cost['engine_batched_s']:.3f} s vs {cost['engine_naive_s']:.3f} s ({cost['engine_speedup']:.2f}x) |",
        f"| dense engine NFE batched / naive | {cost['engine_nfe_batched']} / {cost['engine_nfe_naive']} |",
        f"| dense engine wall / its NFE priced at batch-{cost['batch']} forward cost, plus its reward calls (< 1: its larger batches pay) | {cost['engine_over_estimate']:.2f} |",
        f"| policy forward (batch {cost['batch']}) / forward+backward / reward call | {cost['forward_s'] * 1e3:.1f} / {cost['forward_backward_s'] * 1e3:.1f} / {cost['reward_call_s'] * 1e3:.1f} ms |",
        f"| sampler maths share of rollout time (the same rollout through a fixed velocity / the real one) | {cost['sampler_maths_share'] * 100:.1f}% |",
        "",
    ]
