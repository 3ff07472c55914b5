"""How the sparse-dense gap moves with the lab's three dials: d, T and the reward's stage.

    python benchmarks/bench_lab_sweep.py --out benchmarks/results/lab-sweep --seeds 6

Each dial is moved alone from the lab's defaults (d = 32, T = 16, middle stage); at every
setting Flow-GRPO (``flow-grpo``) and DenseGRPO (``densegrpo``) train on the same seeds, each run
an ordinary ``densegrpo bench sparse-vs-dense CONFIG`` run. The gap is DenseGRPO minus
Flow-GRPO on the held-out ODE reward after equal iterations (equal samples), paired by seed,
with its 95% confidence interval. Writes ``sweep.json``, ``sweep.md`` and ``sweep.png``; a
killed sweep rerun with the same arguments continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

DIALS = {
    "dim": ("latent dimension d", [4, 16, 32, 128]),
    "steps": ("sampling steps T", [4, 8, 16, 32]),
    "stage": ("reward stage (0 coarse, 1 middle, 2 detail)", [0, 1, 2]),
}
ARMS = ("flow-grpo", "densegrpo")


def run_setting(out: Path, seeds: int, **dials: int) -> dict:
    """Both arms at one setting (resumed when its folder holds a started benchmark); returns the gap."""
    from densegrpo.bench.lab import lab_overrides
    from densegrpo.bench.orchestrate import run_or_resume
    from densegrpo.bench.stats import difference_interval

    runs = run_or_resume(out / "-".join(f"{k}{v}" for k, v in dials.items()), lab_overrides(**dials), list(ARMS), seeds)
    numbers = {arm: [r["eval_final"] for r in runs[arm]] for arm in ARMS}  # seeds 0..K-1 in order: paired
    gap = difference_interval(numbers["densegrpo"], numbers["flow-grpo"], paired=True)
    means = {name: (float(np.mean(numbers[arm])), float(np.std(numbers[arm], ddof=1) / np.sqrt(seeds)))
             for name, arm in (("sparse", "flow-grpo"), ("dense", "densegrpo"))}
    return {**dials, **gap, "sparse": means["sparse"][0], "sparse_se": means["sparse"][1], "dense": means["dense"][0], "dense_se": means["dense"][1],
            "nfe": {arm: sum(r["nfe_total"][-1] for r in runs[arm]) / seeds for arm in ARMS}}


def plot(sweep: dict, path: Path) -> None:
    """Top row: each arm's held-out reward (mean +- standard error); bottom row: the paired gap with its 95% CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(2, len(DIALS), figsize=(4.2 * len(DIALS), 6.0), constrained_layout=True, sharey="row")
    for column, (dial, (label, _)) in enumerate(DIALS.items()):
        rows = sweep[dial]
        x = [r[dial] for r in rows]
        top, bottom = axes[0, column], axes[1, column]
        for arm, name in (("sparse", "Flow-GRPO"), ("dense", "DenseGRPO")):
            top.errorbar(x, [r[arm] for r in rows], yerr=[r[f"{arm}_se"] for r in rows], marker="o", capsize=3, label=name)
        errors = [[r["difference"] - r["low"] for r in rows], [r["high"] - r["difference"] for r in rows]]
        bottom.errorbar(x, [r["difference"] for r in rows], yerr=errors, marker="o", capsize=4, color="black")
        bottom.axhline(0, color="grey", lw=0.8)
        for axis in (top, bottom):
            if dial != "stage":
                axis.set_xscale("log", base=2)
            axis.set_xticks(x, [str(v) for v in x])
        bottom.set_xlabel(label)
    axes[0, 0].set_ylabel("held-out reward after training")
    axes[1, 0].set_ylabel("gap: DenseGRPO - Flow-GRPO")
    axes[0, 0].legend()
    figure.suptitle(f"The lab's sparse-dense gap: {sweep['seeds']} paired seeds, {sweep['iterations']} iterations of 64 samples; "
                    "top: mean +- standard error, bottom: paired difference with its 95% CI")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(sweep: dict) -> str:
    lines = ["# The lab's sparse-dense gap against d, T and the reward's stage", "",
             f"Made by `python benchmarks/bench_lab_sweep.py --seeds {sweep['seeds']}`: {sweep['seeds']} paired seeds per setting, "
             f"{sweep['iterations']} iterations of 64 samples; held-out ODE reward after training; other dials at the defaults "
             "(d = 32, T = 16, stage 1). The gap is paired by seed (same prompts and noise). Cost is counted in network evaluations "
             "(NFE: rollouts, the dense engine's ODE completions, training forwards and calibration) rather than seconds, which "
             "a shared machine blurs; the lab report (`--world lab`) measures both. Each setting's full report is in its folder (e.g. "
             "`dim4/bench/report.md`); its wall-clock numbers were taken on a machine shared with other work, so read them as rough.", "", "![sweep](sweep.png)", ""]
    for dial, (label, _) in DIALS.items():
        lines += [f"## {label}", "", "| value | Flow-GRPO (± SE) | DenseGRPO (± SE) | gap [95% CI] | NFE per run sparse / dense (ratio) |", "|---|---|---|---|---|"]
        for r in sweep[dial]:
            lines.append(f"| {r[dial]} | {r['sparse']:.3f} ± {r['sparse_se']:.3f} | {r['dense']:.3f} ± {r['dense_se']:.3f} | {r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | "
                         f"{r['nfe']['flow-grpo']:.0f} / {r['nfe']['densegrpo']:.0f} ({r['nfe']['densegrpo'] / r['nfe']['flow-grpo']:.1f}x) |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("lab-sweep"))
    parser.add_argument("--seeds", type=int, default=6)
    args = parser.parse_args()
    from densegrpo.bench.lab import LAB_ITERATIONS

    sweep: dict = {"seeds": args.seeds, "iterations": LAB_ITERATIONS}
    for dial, (_, values) in DIALS.items():
        sweep[dial] = [run_setting(args.out, args.seeds, **{dial: value}) for value in values]
        print(json.dumps({dial: [(r[dial], round(r["difference"], 3), round(r["half_width"], 3)) for r in sweep[dial]]}), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sweep.json").write_text(json.dumps(sweep, indent=1), encoding="utf-8")
    (args.out / "sweep.md").write_text(table(sweep), encoding="utf-8")
    plot(sweep, args.out / "sweep.png")
    print(args.out / "sweep.md")


if __name__ == "__main__":
    main()
