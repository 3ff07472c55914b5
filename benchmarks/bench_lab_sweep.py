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

import yaml

DIALS = {
    "dim": ("latent dimension d", [4, 16, 32, 128]),
    "steps": ("sampling steps T", [4, 8, 16, 32]),
    "stage": ("reward stage (0 coarse, 1 middle, 2 detail)", [0, 1, 2]),
}
ARMS = ("flow-grpo", "densegrpo")


def setting_config(folder: Path, **dials: int) -> Path:
    """Write the lab's run config with ``dials`` changed; returns its path."""
    from densegrpo import config as cfg
    from densegrpo.bench.lab import lab_overrides

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.resolve(None, lab_overrides(**dials)).model_dump(mode="json"), sort_keys=False), encoding="utf-8")
    return path


def run_setting(out: Path, seeds: int, **dials: int) -> dict:
    """Both arms at one setting (resumed when its folder holds a started benchmark); returns the gap."""
    from densegrpo.bench.orchestrate import read_results, run_sparse_vs_dense
    from densegrpo.bench.stats import difference_interval

    folder = out / "-".join(f"{k}{v}" for k, v in dials.items())
    bench = folder / "bench"
    if (bench / "results.json").exists():
        run_sparse_vs_dense(out=bench, resume=True, costs=False)
    else:
        run_sparse_vs_dense(seeds=seeds, arms=list(ARMS), out=bench, config=setting_config(folder, **dials), costs=False)
    results = read_results(bench)
    (runs,) = results["runs"].values()
    numbers = {arm: [r["eval_final"] for r in runs[arm]] for arm in ARMS}  # seeds 0..K-1 in order: paired
    gap = difference_interval(numbers["densegrpo"], numbers["flow-grpo"], paired=True)
    return {**dials, **gap, "sparse": sum(numbers["flow-grpo"]) / seeds, "dense": sum(numbers["densegrpo"]) / seeds,
            "wall_s": {arm: sum(r["wall_s"][-1] for r in runs[arm]) / seeds for arm in ARMS}}


def plot(sweep: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(DIALS), figsize=(4.2 * len(DIALS), 3.4), constrained_layout=True)
    for axis, (dial, (label, _)) in zip(axes, DIALS.items()):
        rows = sweep[dial]
        x = [r[dial] for r in rows]
        y = [r["difference"] for r in rows]
        errors = [[r["difference"] - r["low"] for r in rows], [r["high"] - r["difference"] for r in rows]]
        axis.errorbar(x, y, yerr=errors, marker="o", capsize=4)
        axis.axhline(0, color="grey", lw=0.8)
        axis.set_xlabel(label)
        if dial != "stage":
            axis.set_xscale("log", base=2)
        axis.set_xticks(x, [str(v) for v in x])
        axis.set_ylabel("held-out reward, DenseGRPO - Flow-GRPO")
    figure.suptitle(f"Lab: the sparse-dense gap, 95% CI paired over {sweep['seeds']} seeds, {sweep['iterations']} iterations")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(sweep: dict) -> str:
    lines = ["# The lab's sparse-dense gap against d, T and the reward's stage", "",
             f"Made by `python benchmarks/bench_lab_sweep.py --seeds {sweep['seeds']}`: {sweep['seeds']} paired seeds per setting, "
             f"{sweep['iterations']} iterations of 64 samples; held-out ODE reward after training; other dials at the defaults "
             "(d = 32, T = 16, stage 1).", "", "![sweep](sweep.png)", ""]
    for dial, (label, _) in DIALS.items():
        lines += [f"## {label}", "", "| value | Flow-GRPO | DenseGRPO | gap [95% CI] | s per run sparse / dense |", "|---|---|---|---|---|"]
        for r in sweep[dial]:
            lines.append(f"| {r[dial]} | {r['sparse']:.3f} | {r['dense']:.3f} | {r['difference']:+.3f} [{r['low']:+.3f}, {r['high']:+.3f}] | "
                         f"{r['wall_s']['flow-grpo']:.1f} / {r['wall_s']['densegrpo']:.1f} |")
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
