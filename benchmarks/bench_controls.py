"""Do the peers' per-step controls help? Each one against the plain recipe, in the lab or the toy world.

    python benchmarks/bench_controls.py --out benchmarks/results/controls --seeds 10
    python benchmarks/bench_controls.py --world toy --out benchmarks/results/controls-toy --seeds 5 --jobs 2

The controls of train.ratio_norm, train.step_weighting and the ``dance-sde`` sampler (method.md
section 2, per-step controls) are each switched on alone in the lab world (``--world lab``'s
run: d = 32, T = 16, the middle stage, 20 iterations of 64 samples) and trained with Flow-GRPO
(``flow-grpo``) and DenseGRPO (``densegrpo``) on the same seeds as the plain recipe. For every
control and arm it reports the held-out ODE reward after training and its difference from the
plain recipe, paired by seed, with a 95% confidence interval; each setting is an ordinary
``densegrpo bench sparse-vs-dense CONFIG`` folder. Writes ``controls.json``, ``controls.md`` and
``controls.png``; a killed run rerun with the same arguments continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CONTROLS = {
    "plain": ("the recipe as it is (Flow-GRPO's loss)", []),
    "ratio-norm": ("GRPO-Guard's RatioNorm, clip 2e-6 (its OCR config)", ["train.ratio_norm=true", "train.clip_range=2e-6"]),
    "grpo-guard": ("RatioNorm + GRPO-Guard's 1/(-dt) step weights, clip 2e-6",
                   ["train.ratio_norm=true", "train.clip_range=2e-6", "train.step_weighting=grpo-guard"]),
    "tempflow": ("TempFlow-GRPO's noise-aware step weights", ["train.step_weighting=tempflow"]),
    "dance-sde": ("DanceGRPO's SDE (constant eta = the run's noise level)", ["sampler.name=dance-sde"]),
}
ARMS = ("flow-grpo", "densegrpo")


def world_overrides(world: str) -> list[str]:
    """The ``--set`` overrides of the benchmark's run in ``world``: ``lab`` (``--world lab``) or
    ``toy`` (the default profile on toy-geneval, the calibrator sized as its calibrated arms)."""
    from densegrpo.bench.arms import PROFILES, toy_overrides
    from densegrpo.bench.lab import lab_overrides

    if world == "lab":
        return lab_overrides()
    profile = PROFILES["default"]
    return [*toy_overrides("toy-geneval", profile, profile.iterations), *profile.calibration_overrides(), *profile.overrides]


def run_control(out: Path, world: str, name: str, seeds: int, jobs: int) -> dict[str, list[float]]:
    """Both arms with control ``name`` (resumed when its folder holds a started benchmark);
    returns ``{arm: held-out reward per seed 0..K-1}``."""
    from densegrpo.bench.orchestrate import run_or_resume

    runs = run_or_resume(out / name, [*world_overrides(world), *CONTROLS[name][1]], list(ARMS), seeds, jobs)
    return {arm: [r["eval_final"] for r in runs[arm]] for arm in ARMS}


def compare(rewards: dict[str, dict[str, list[float]]]) -> dict[str, dict[str, dict]]:
    """``{control: {arm: {"mean", "se", "difference", "low", "high", ...}}}``: each control's reward
    and its paired difference from ``plain`` on the same seeds."""
    from densegrpo.bench.stats import difference_interval, verdict

    table: dict[str, dict[str, dict]] = {}
    for name, by_arm in rewards.items():
        table[name] = {}
        for arm, values in by_arm.items():
            row = {"mean": float(np.mean(values)), "se": float(np.std(values, ddof=1) / np.sqrt(len(values)))}
            if name != "plain":
                interval = difference_interval(values, rewards["plain"][arm], paired=True)
                row |= interval | {"verdict": verdict(interval)}
            table[name][arm] = row
    return table


WORLD_TEXT = {
    "lab": ("in the credit-assignment lab", "the lab world of `densegrpo bench sparse-vs-dense --world lab` (d = 32, T = 16, reward "
            "at the middle stage, 20 iterations of 64 samples)"),
    "toy": ("in the toy world", "the toy world of `densegrpo bench sparse-vs-dense` (the main job's policy, toy-geneval, 32 "
            "iterations of 128 samples, 81 held-out prompts x 2 images)"),
}


def markdown(table: dict, seeds: int, world: str, command: str) -> str:
    lines = [f"# The peers' per-step controls {WORLD_TEXT[world][0]}", "",
             f"Made by `{command}`: {WORLD_TEXT[world][1]}, each control switched "
             f"on alone; {seeds} seeds per arm, the same seeds (prompts and noise) in every row, so each difference from the "
             "plain recipe is paired by seed. Reward: held-out ODE reward after training (mean ± standard error); difference: "
             "95% CI; verdict as in the benchmark report (holds: above 0, fails: below 0, tie: straddles 0 within ± 0.02). Each "
             "control's full report is in its folder (e.g. `ratio-norm/bench/report.md`); its wall-clock numbers were taken on a "
             "machine shared with other work, so read them as rough.",
             "", "![controls](controls.png)", "",
             "| control | what | " + " | ".join(f"{arm} reward | {arm} - plain [95% CI] | verdict" for arm in ARMS) + " |",
             "|---|---|" + "---|---|---|" * len(ARMS)]
    for name, by_arm in table.items():
        cells = []
        for arm in ARMS:
            r = by_arm[arm]
            cells.append(f"{r['mean']:.3f} ± {r['se']:.3f}")
            cells += ["-", "-"] if name == "plain" else [f"{r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}]", r["verdict"]]
        lines.append(f"| {name} | {CONTROLS[name][0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(table: dict, seeds: int, world: str, path: Path) -> None:
    """Each control's paired difference from the plain recipe, per arm, with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in table if n != "plain"]
    figure, axis = plt.subplots(figsize=(7.5, 3.6), constrained_layout=True)
    for offset, arm in zip((-0.12, 0.12), ARMS):
        rows = [table[n][arm] for n in names]
        x = np.arange(len(names)) + offset
        errors = [[r["difference"] - r["low"] for r in rows], [r["high"] - r["difference"] for r in rows]]
        axis.errorbar(x, [r["difference"] for r in rows], yerr=errors, fmt="o", capsize=4, label=arm)
    axis.axhline(0, color="grey", lw=0.8)
    axis.set_xticks(range(len(names)), names)
    axis.set_ylabel("held-out reward, control - plain")
    axis.set_title(f"Per-step controls {WORLD_TEXT[world][0]}: paired difference over {seeds} seeds (95% CI)")
    axis.legend()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("controls"))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--world", choices=list(WORLD_TEXT), default="lab")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel processes, as the benchmark's --jobs")
    parser.add_argument("--control", action="append", choices=list(CONTROLS), help="run only these (repeatable; plain always runs)")
    args = parser.parse_args()
    names = ["plain", *[n for n in (args.control or CONTROLS) if n != "plain"]]
    rewards = {}
    for name in names:
        rewards[name] = run_control(args.out, args.world, name, args.seeds, args.jobs)
        print(json.dumps({name: {arm: round(float(np.mean(v)), 4) for arm, v in rewards[name].items()}}), flush=True)
    table = compare(rewards)
    command = " ".join(["python benchmarks/bench_controls.py", *([f"--world {args.world}"] if args.world != "lab" else []),
                        f"--seeds {args.seeds}", *([f"--jobs {args.jobs}"] if args.jobs > 1 else [])])
    (args.out / "controls.json").write_text(json.dumps({"world": args.world, "seeds": args.seeds, "controls": table}, indent=1), encoding="utf-8")
    (args.out / "controls.md").write_text(markdown(table, args.seeds, args.world, command), encoding="utf-8")
    plot(table, args.seeds, args.world, args.out / "controls.png")
    print(args.out / "controls.md")


if __name__ == "__main__":
    main()
