"""``metrics.jsonl`` (one JSON object per iteration), ``summary.json`` and the reward curve."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densegrpo.run import plots
from densegrpo.run.hooks.evaluation import EVALUATIONS
from densegrpo.run.monitors import monitor_summary

if TYPE_CHECKING:
    from densegrpo.run.state import Run

METRICS = "metrics.jsonl"


def truncate_metrics(path: Path, before_iteration: int) -> None:
    """Drop lines logged after the checkpoint we resume from (they will be recomputed identically)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("iteration", -1) < before_iteration:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a torn last line from a kill
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    os.replace(tmp, path)


def evaluation_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Base, final reward and final paired gain of each evaluation that ran, from the metrics rows."""
    summary: dict[str, Any] = {}
    for prefix in EVALUATIONS:
        evals = [r[f"{prefix}_reward"] for r in rows if f"{prefix}_reward" in r]
        if prefix != "eval" and not evals:
            continue  # an evaluation that is off leaves no keys (eval_* keys are always there)
        base = next((r[f"{prefix}_reward_base"] for r in rows if f"{prefix}_reward_base" in r), None)
        gains = [(r[f"{prefix}_gain"], r[f"{prefix}_gain_se"]) for r in rows if f"{prefix}_gain" in r]
        summary.update({
            f"{prefix}_reward_base": base, f"{prefix}_reward_final": evals[-1] if evals else None,
            f"{prefix}_gain_final": gains[-1][0] if gains else None,
            f"{prefix}_gain_se_final": gains[-1][1] if gains else None,
        })
    return summary


class MetricsHook:
    """Stamps each record with the run's clocks and appends it to ``metrics.jsonl`` (rank 0); at
    the end draws ``reward_curve.png`` and writes ``summary.json`` (with the monitors' finals). A resumed run first drops
    the lines past its checkpoint."""

    def before_training(self, run: "Run") -> None:
        if run.world.is_main:  # a fresh run's folder has no metrics file yet
            truncate_metrics(run.run_dir / METRICS, run.iteration)

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        run.totals["elapsed_s"] = run.elapsed()
        record["wall_s"] = round(run.totals["wall_s"], 3)
        record["elapsed_s"] = round(run.totals["elapsed_s"], 3)
        if run.world.is_main:
            with open(run.run_dir / METRICS, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        if not run.world.is_main:
            return
        lines = (run.run_dir / METRICS).read_text(encoding="utf-8").splitlines() if (run.run_dir / METRICS).exists() else []
        rows = [json.loads(line) for line in lines if line.strip()]
        if rows:
            plots.plot_reward_curve(rows, run.run_dir / "reward_curve.png")
            summary.update({"reward_first": rows[0]["reward_mean"], "reward_last": rows[-1]["reward_mean"]})
            summary.update(evaluation_summary(rows))
            summary.update(monitor_summary(rows))
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
