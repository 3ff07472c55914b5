"""``step_diagnostics.png``: the per-step metrics of the run so far, redrawn at each evaluation
(``logging.step_diagnostics``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densegrpo.run import plots
from densegrpo.run.hooks.metrics import METRICS

if TYPE_CHECKING:
    from densegrpo.run.state import Run

DIAGNOSTICS = "step_diagnostics.png"


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """The rows of ``run_dir/metrics.jsonl`` (a torn last line from a kill is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class StepDiagnosticsHook:
    """Rank 0 redraws the page from ``metrics.jsonl`` whenever the evaluation runs. It comes
    after the metrics hook, so the file already holds the iteration it was called for."""

    def before_training(self, run: "Run") -> None:
        pass

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        if run.world.is_main and run.due(run.config.logging.sample_every):
            rows = read_metrics(run.run_dir)
            if rows:
                plots.plot_step_diagnostics(rows, run.run_dir / DIAGNOSTICS)

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        pass
