"""``densegrpo bench sparse-vs-dense``: credit-assignment schemes compared on the toy world.

Every arm is a plain combination of registered components (config overrides), run with
the same GRPO loop as ``densegrpo train``. Results land in ``OUT/``: ``results.json``
(every curve and summary), ``report.md`` (tables), PNG curves against iteration, NFE and
wall-clock (mean +- std over seeds), and the calibrated psi(t) against the uniform level.
"""

from __future__ import annotations

import json
import math
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from densegrpo import config as cfg
from densegrpo.errors import UserError

# name -> (description, overrides). n = t is the DenseGRPO arm itself.
ARMS: dict[str, tuple[str, list[str]]] = {
    "flow-grpo": ("Flow-GRPO: sparse + uniform", ["advantage.name=sparse", "calibrator.name=uniform"]),
    "densegrpo": ("DenseGRPO: dense (n = t) + reward-aware", ["advantage.name=dense", "calibrator.name=reward-aware"]),
    "dense-uniform": ("dense (n = t) + uniform", ["advantage.name=dense", "calibrator.name=uniform"]),
    "sparse-calibrated": ("sparse + reward-aware", ["advantage.name=sparse", "calibrator.name=reward-aware"]),
    "dense-raw": ("dense-raw (R_{t-1} as step reward) + uniform", ["advantage.name=dense-raw", "calibrator.name=uniform"]),
    "dense-n1": ("DenseGRPO with ODE completion n = 1", ["advantage.name=dense", "advantage.config.completion=1", "calibrator.name=reward-aware"]),
    "dense-n2": ("DenseGRPO with ODE completion n = 2", ["advantage.name=dense", "advantage.config.completion=2", "calibrator.name=reward-aware"]),
    "dense-return": ("dense-return (discounted reward-to-go) + reward-aware", ["advantage.name=dense-return", "calibrator.name=reward-aware"]),
}
DEFAULT_REWARDS = ("toy-geneval", "toy-clip")
PAPER_COST_RATIO = 19.0 / 11.0  # DenseGRPO paper: 19 vs 11 GPU-hours per 20 steps, n = t vs n = 1


@dataclass
class Profile:
    """Run sizes of a benchmark profile."""

    iterations: int
    group_size: int
    groups: int
    calibration_rounds: int
    calibration_samples: int
    eval_prompts: int
    overrides: list[str] = field(default_factory=list)


PROFILES = {
    "quick": Profile(iterations=2, group_size=4, groups=2, calibration_rounds=1, calibration_samples=8, eval_prompts=4, overrides=["sampling.eval_steps=10"]),
    # On the 16 px toy (the main job's policy): 8 iterations of 2 x 8 samples, 48 runs in about 15 minutes on 2 cores.
    "default": Profile(
        iterations=8, group_size=8, groups=2, calibration_rounds=2, calibration_samples=16, eval_prompts=32,
        overrides=["logging.sample_prompts=0", "logging.eval_images_per_prompt=2"],  # as the committed results were made
    ),
}


def arm_config(arm: str, reward: str, seed: int, profile: Profile, iterations: int) -> cfg.RunConfig:
    _, overrides = ARMS[arm]
    return cfg.resolve(
        None,
        [
            f"seed={seed}",
            "prompts.train=toy-train",  # the whole training set, not the main job's focus set
            "logging.train_eval_images_per_prompt=0",
            f"iterations={iterations}",
            "checkpoint_every=0",
            f"rewards.0.name={reward}",
            f"train.group_size={profile.group_size}",
            f"train.groups_per_iteration={profile.groups}",
            "logging.progress=false",
            "logging.sample_every=0",
            "logging.sample_prompts=8",
            f"logging.eval_prompts={profile.eval_prompts}",
            *overrides,
            *([f"calibrator.config.max_rounds={profile.calibration_rounds}", f"calibrator.config.samples_per_round={profile.calibration_samples}"] if "reward-aware" in " ".join(overrides) else []),
            *profile.overrides,
        ],
    )


def _rows(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines() if line.strip()]


def _smooth(values: np.ndarray, window: int = 3) -> np.ndarray:
    if len(values) < window:
        return values
    kernel = np.ones(window) / window
    padded = np.concatenate([np.full(window - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def _interp(x: np.ndarray, y: np.ndarray, at: float) -> float:
    if at < x[0]:
        return float("nan")
    return float(np.interp(at, x, y))


def summarise_run(rows: list[dict[str, Any]], summary: dict[str, Any]) -> dict[str, Any]:
    reward = np.array([r["reward_mean"] for r in rows], dtype=float)
    return {
        "iteration": [r["iteration"] + 1 for r in rows],
        "reward": reward.tolist(),
        "reward_smooth": _smooth(reward).tolist(),
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


def _mean_std(values: list[float]) -> tuple[float, float]:
    array = np.array([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    if array.size == 0:
        return float("nan"), float("nan")
    return float(array.mean()), float(array.std(ddof=0))


def _fmt(pair: tuple[float, float], digits: int = 3) -> str:
    mean, std = pair
    return "n/a" if math.isnan(mean) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def measure_costs(reward: str, group_size: int, groups: int) -> dict[str, Any]:
    """Forward/backward/reward costs of the toy policy, the dense engine (batched vs naive), the floor."""
    from densegrpo import registry
    from densegrpo.dense import DenseRewardEngine
    from densegrpo.grpo import RewardScorer
    from densegrpo.build import WeightedReward
    from densegrpo.evaluate import load_prompt_records
    from densegrpo.noise import draw_noise
    from densegrpo.sigmas import make_sigmas

    config = cfg.default_config()
    T = config.sampling.num_steps
    N = group_size * groups
    policy = registry.load("policies", config.policy.name, config.policy.config)  # the arms' policy (the 16 px toy)
    sampler = registry.load("samplers", "flow-sde")
    model = registry.load("rewards", reward)
    records = load_prompt_records("toy-train")[:N]
    records = (records * ((N // max(len(records), 1)) + 1))[:N]
    prompts = [r["prompt"] for r in records]
    scorer = RewardScorer([WeightedReward(reward, 1.0, model)], prompts, [r for r in records])
    sigmas = make_sigmas(T, config.sampling.shift)
    noise, step_noise = draw_noise(0, 0, list(range(N)), tuple(policy.latent_shape), T)
    cond = policy.encode(prompts)
    x = noise.to(policy.device)
    sigma = torch.full((N,), 0.5)

    def timed(fn, repeat=5):
        fn()
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    with torch.no_grad():
        forward = timed(lambda: policy.velocity(x, sigma, cond))
        images = policy.decode(x)
        reward_call = timed(lambda: scorer(images, torch.arange(N)))

    def forward_backward():
        out = policy.velocity(x, sigma, cond)
        out.float().pow(2).mean().backward()
        for p in policy.trainable_parameters():
            p.grad = None

    backward = timed(forward_backward)
    with torch.no_grad():
        traj = sampler.rollout(policy, cond, x, sigmas, torch.full((T,), 0.7), step_noise=step_noise)
        rollout = timed(lambda: sampler.rollout(policy, cond, x, sigmas, torch.full((T,), 0.7), step_noise=step_noise), repeat=3)
        batched_engine = DenseRewardEngine(completion="t", mode="batched")
        naive_engine = DenseRewardEngine(completion="t", mode="naive")
        batched = timed(lambda: batched_engine(policy, traj, scorer), repeat=3)
        naive = timed(lambda: naive_engine(policy, traj, scorer), repeat=3)
        nfe_batched = batched_engine(policy, traj, scorer).nfe
        nfe_naive = naive_engine(policy, traj, scorer).nfe
    per_sample_forward = forward / N
    trained = max(1, int(T * config.train.timestep_fraction))
    train_cost = trained * (backward + forward)  # policy forward+backward and reference forward per trained step
    floor_sparse = T * forward + reward_call + train_cost
    engine_floor = nfe_batched * per_sample_forward + (T + 1) * reward_call
    floor_dense = T * forward + engine_floor + train_cost
    return {
        "batch": N,
        "num_steps": T,
        "forward_s": forward,
        "forward_backward_s": backward,
        "reward_call_s": reward_call,
        "rollout_s": rollout,
        "sampler_overhead_share": max(0.0, (rollout - T * forward) / rollout),
        "engine_batched_s": batched,
        "engine_naive_s": naive,
        "engine_speedup": naive / batched,
        "engine_nfe_batched": nfe_batched,
        "engine_nfe_naive": nfe_naive,
        "engine_floor_s": engine_floor,
        "engine_over_floor": batched / engine_floor,
        "floor_sparse_s": floor_sparse,
        "floor_dense_s": floor_dense,
        "floor_ratio": floor_dense / floor_sparse,
    }


def rerender(out: Path) -> Path:
    """Recompute the summary and rewrite report.md and the plots from ``out/results.json``."""
    path = Path(out) / "results.json"
    if not path.exists():
        raise UserError(f"'{path}' does not exist; run the benchmark into --out {out} first")
    results = json.loads(path.read_text(encoding="utf-8"))
    results["summary"] = summarise(results)
    _write(path, results)
    plot_curves(results, Path(out))
    plot_psi(Path(out), list(results["runs"]))
    (Path(out) / "report.md").write_text(render_report(results), encoding="utf-8")
    return Path(out) / "report.md"


def run_sparse_vs_dense(
    seeds: int = 3,
    iterations: int | None = None,
    rewards: list[str] | None = None,
    out: Path = Path("bench-sparse-vs-dense"),
    quick: bool = False,
    arms: list[str] | None = None,
    workers: int = 1,
) -> Path:
    if workers < 1:
        raise UserError("--jobs must be at least 1")
    threads = max(1, torch.get_num_threads() // workers)
    profile = PROFILES["quick" if quick else "default"]
    iterations = iterations or profile.iterations
    rewards = list(rewards or DEFAULT_REWARDS)
    arms = list(arms or ARMS)
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise UserError(f"unknown arm(s) {', '.join(unknown)}; available: {', '.join(ARMS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "command": "densegrpo " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv and "bench" in sys.argv else "densegrpo bench sparse-vs-dense",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, {platform.python_version()}, torch {torch.__version__}",
        "profile": "quick" if quick else "default",
        "iterations": iterations,
        "seeds": seeds,
        "group_size": profile.group_size,
        "groups_per_iteration": profile.groups,
        "arms": {a: ARMS[a][0] for a in arms},
        "runs": {},
        "costs": {},
    }
    jobs = [(reward, arm, seed) for reward in rewards for arm in arms for seed in range(seeds)]
    tasks = [(str(out / "runs" / r / a / f"seed{s}"), arm_config(a, r, s, profile, iterations).model_dump(mode="json"), threads) for r, a, s in jobs]
    results["jobs"] = workers
    results["torch_threads_per_run"] = threads
    progress = tqdm(total=len(jobs), desc="bench", unit="run", dynamic_ncols=True)
    if workers == 1:
        outputs = (_run_one(task) for task in tasks)
    else:
        import multiprocessing

        pool = multiprocessing.get_context("spawn").Pool(workers)
        outputs = pool.imap(_run_one, tasks)
    for (reward, arm, seed), (rows, summary) in zip(jobs, outputs):
        progress.update(1)
        progress.set_postfix_str(f"{reward} {arm} seed {seed}")
        results["runs"].setdefault(reward, {}).setdefault(arm, []).append(summarise_run(rows, summary))
        _write(out / "results.json", results)
    progress.close()
    if workers > 1:
        pool.close()
        pool.join()
    for reward in rewards:
        results["costs"][reward] = measure_costs(reward, profile.group_size, profile.groups)
    results["summary"] = summarise(results)
    results["bench_wall_s"] = time.perf_counter() - started
    _write(out / "results.json", results)
    plot_curves(results, out)
    plot_psi(out, rewards)
    (out / "report.md").write_text(render_report(results), encoding="utf-8")
    return out / "report.md"


def _run_one(task: tuple[str, dict[str, Any], int]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """One training run (in this process or a worker): returns its metrics rows and summary."""
    import shutil

    from densegrpo.train import run_training

    run_dir, data, threads = Path(task[0]), task[1], task[2]
    torch.set_num_threads(threads)
    if run_dir.exists():
        shutil.rmtree(run_dir)
    summary = run_training(cfg.validate(data), run_dir)
    return _rows(run_dir), summary


def _write(path: Path, data: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1), encoding="utf-8")
    tmp.replace(path)


def summarise(results: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for reward, arms in results["runs"].items():
        wall_budget = min(min(run["wall_s"][-1] for run in runs) for runs in arms.values())
        nfe_budget = min(min(run["nfe_total"][-1] for run in runs) for runs in arms.values())
        rows: dict[str, Any] = {}
        for arm, runs in arms.items():
            rows[arm] = {
                "final_reward": _mean_std([r["final_reward"] for r in runs]),
                "eval_final": _mean_std([r["eval_final"] for r in runs]),
                "eval_base": _mean_std([r["eval_base"] for r in runs]),
                "reward_at_wall": _mean_std([_interp(np.array(r["wall_s"]), np.array(r["reward_smooth"]), wall_budget) for r in runs]),
                "reward_at_nfe": _mean_std([_interp(np.array(r["nfe_total"], dtype=float), np.array(r["reward_smooth"]), nfe_budget) for r in runs]),
                "iteration_s": _mean_std([float(np.mean(r["iteration_s"])) for r in runs]),
                "nfe_rollout": runs[0]["nfe_rollout"],
                "nfe_dense": runs[0]["nfe_dense"],
                "nfe_train": runs[0]["nfe_train"],
                "nfe_calibration": runs[0]["nfe_calibration"],
                "mean_curve": np.mean([r["reward_smooth"] for r in runs], axis=0).tolist(),
            }
        if "flow-grpo" in rows:
            target = rows["flow-grpo"]["mean_curve"][-1]
            sparse_iters = _first_reach(rows["flow-grpo"]["mean_curve"], target)
            for arm, row in rows.items():
                reached = _first_reach(row["mean_curve"], target)
                row["iterations_to_sparse_final"] = reached
                row["iterations_ratio"] = (reached / sparse_iters) if (reached and sparse_iters) else None
        summary[reward] = {"wall_budget_s": wall_budget, "nfe_budget": nfe_budget, "arms": rows}
    return summary


def _first_reach(curve: list[float], target: float) -> int | None:
    for index, value in enumerate(curve):
        if value >= target - 1e-12:
            return index + 1
    return None


def _band(ax: Any, xs: list[np.ndarray], ys: list[np.ndarray], label: str, color: Any) -> None:
    grid = np.linspace(max(x[0] for x in xs), min(x[-1] for x in xs), 50)
    values = np.array([np.interp(grid, x, y) for x, y in zip(xs, ys)])
    mean, std = values.mean(0), values.std(0)
    ax.plot(grid, mean, label=label, color=color)
    ax.fill_between(grid, mean - std, mean + std, color=color, alpha=0.15)


def plot_curves(results: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_spec = [("iteration", "iteration"), ("nfe_total", "NFE (velocity evaluations, all phases)"), ("wall_s", "wall-clock training seconds")]
    rewards = list(results["runs"])
    cmap = plt.get_cmap("tab10")
    for key, label in axes_spec:
        fig, axes = plt.subplots(1, len(rewards), figsize=(6.5 * len(rewards), 4.2), squeeze=False)
        for ax, reward in zip(axes[0], rewards):
            for index, (arm, runs) in enumerate(results["runs"][reward].items()):
                xs = [np.array(r[key], dtype=float) for r in runs]
                ys = [np.array(r["reward_smooth"], dtype=float) for r in runs]
                _band(ax, xs, ys, arm, cmap(index % 10))
            ax.set_title(f"{reward}: training reward vs {label.split(' (')[0]}")
            ax.set_xlabel(label)
            ax.set_ylabel("reward (3-iteration moving average)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"reward_vs_{key.replace('_total', '').replace('_s', '')}.png", dpi=110)
        plt.close(fig)


def plot_psi(out: Path, rewards: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for reward in rewards:
        for seed_dir in sorted((out / "runs" / reward / "densegrpo").glob("seed*")):
            path = seed_dir / "calibration.jsonl"
            if not path.exists():
                continue
            rounds = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            if rounds:
                psi = rounds[-1]["noise_level_next"]
                ax.plot(range(len(psi)), psi, marker="o", alpha=0.7, label=f"{reward} {seed_dir.name}")
                drawn = True
    ax.axhline(0.7, color="black", linestyle="--", label="uniform a = 0.7")
    ax.set_xlabel("step index k (0 = pure noise)")
    ax.set_ylabel("noise level")
    ax.set_title("Calibrated psi(t) (DenseGRPO Algorithm 1) vs uniform")
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "psi.png", dpi=110)
    plt.close(fig)


def render_report(results: dict[str, Any]) -> str:
    lines = [
        "# Sparse vs dense GRPO on the toy world",
        "",
        f"Produced by `{results['command']}` on {results['date']} ({results['machine']}); profile `{results['profile']}`, "
        f"{results['iterations']} iterations, {results['seeds']} seeds per arm, batch {results['group_size']} x {results['groups_per_iteration']} groups. "
        "Every number below was computed by the command; nothing is typed by hand.",
        "",
        "Reward = the terminal reward of the training rollouts (SDE), 3-iteration moving average; eval = ODE samples (40 steps) on test prompts after training. "
        "Wall-clock counts training compute only (calibration, rollouts, rewards, updates), not evaluation.",
        "",
        "![reward vs iteration](reward_vs_iteration.png)",
        "![reward vs NFE](reward_vs_nfe.png)",
        "![reward vs wall-clock](reward_vs_wall.png)",
        "![psi](psi.png)",
        "",
    ]
    for reward, block in results["summary"].items():
        lines += [
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
                f"| {arm} | {_fmt(row['final_reward'])} | {_fmt(row['eval_base'])} -> {_fmt(row['eval_final'])} | {_fmt(row['reward_at_wall'])} | "
                f"{_fmt(row['reward_at_nfe'])} | {_fmt(row['iteration_s'], 2)} | {row['nfe_rollout']:.0f} + {row['nfe_dense']:.0f} + {row['nfe_train']:.0f} | "
                f"{row['nfe_calibration']:.0f} | {reach if reach else 'not reached'}{f' ({ratio:.2f}x)' if ratio else ''} |"
            )
        lines.append("")
        lines += _claims(reward, block)
        cost = results["costs"].get(reward)
        if cost:
            lines += _cost_section(cost, block)
    return "\n".join(lines) + "\n"


def _verdict(a: tuple[float, float], b: tuple[float, float]) -> str:
    """'yes' / 'no' for a > b, flagged when the gap is smaller than the seeds' spread."""
    answer = "yes" if a[0] > b[0] else "no"
    noise = max(a[1], b[1])
    return answer if abs(a[0] - b[0]) > noise else f"{answer}, within seed noise (gap {abs(a[0] - b[0]):.3f} < std {noise:.3f})"


def _claims(reward: str, block: dict[str, Any]) -> list[str]:
    arms = block["arms"]
    out = ["Claims checked (measured, not assumed):", ""]

    def final(arm: str) -> tuple[float, float]:
        return tuple(arms[arm]["final_reward"]) if arm in arms else (float("nan"), float("nan"))

    if "densegrpo" in arms and "flow-grpo" in arms:
        ratio = arms["densegrpo"].get("iterations_ratio")
        curve = arms["flow-grpo"]["mean_curve"]
        degenerate = len(curve) > 1 and curve[-1] <= curve[0]
        out.append(
            f"- Dense reaches sparse's final reward in <= 0.6x the iterations: {'yes' if ratio and ratio <= 0.6 else 'no'} "
            f"(ratio {ratio if ratio is not None else 'not reached'})"
            + ("; degenerate here: sparse's final reward is not above its first iteration's, so every arm 'reaches' it at once." if degenerate else ".")
        )
        out.append(f"- Dense wins at equal wall-clock: {_verdict(tuple(arms['densegrpo']['reward_at_wall']), tuple(arms['flow-grpo']['reward_at_wall']))} "
                   f"({arms['densegrpo']['reward_at_wall'][0]:.3f} vs {arms['flow-grpo']['reward_at_wall'][0]:.3f}).")
    if "densegrpo" in arms and "dense-raw" in arms:
        out.append(f"- Gain > raw: {_verdict(final('densegrpo'), final('dense-raw'))} ({final('densegrpo')[0]:.3f} vs {final('dense-raw')[0]:.3f}).")
    if {"densegrpo", "dense-n2", "dense-n1"} <= set(arms):
        a, b, c = final("densegrpo"), final("dense-n2"), final("dense-n1")
        out.append(f"- n = t > n = 2: {_verdict(a, b)}; n = 2 > n = 1: {_verdict(b, c)} ({a[0]:.3f}, {b[0]:.3f}, {c[0]:.3f}).")
    out.append("- 'n/a' at equal NFE: the arm's calibration plus first iteration already exceed the budget.")
    out.append("")
    return out


def _cost_section(cost: dict[str, Any], block: dict[str, Any]) -> list[str]:
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
        f"| same ratio, arithmetic floor from NFE counts and measured forward/backward/reward costs | {cost['floor_ratio']:.2f}x |",
        f"| paper's implied ratio (19 / 11 GPU-hours, n = t vs n = 1) | {PAPER_COST_RATIO:.2f}x |",
        f"| dense engine batched+reuse vs naive | {cost['engine_batched_s']:.3f} s vs {cost['engine_naive_s']:.3f} s ({cost['engine_speedup']:.2f}x) |",
        f"| dense engine NFE batched / naive | {cost['engine_nfe_batched']} / {cost['engine_nfe_naive']} |",
        f"| dense engine wall / its compute floor | {cost['engine_over_floor']:.2f} |",
        f"| policy forward (batch {cost['batch']}) / forward+backward / reward call | {cost['forward_s'] * 1e3:.1f} / {cost['forward_backward_s'] * 1e3:.1f} / {cost['reward_call_s'] * 1e3:.1f} ms |",
        f"| sampler maths share of rollout time | {cost['sampler_overhead_share'] * 100:.1f}% |",
        "",
    ]
