"""``densegrpo report RUN_DIR``: a run's summary table on the terminal and one self-contained
HTML page (``report.html``) with its curves, per-step diagnostics and first and latest sample
grids. It only reads the run folder, so it also works on a run still training."""

from __future__ import annotations

import base64
import html
import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from densegrpo.contracts.errors import UserError
from densegrpo.run import plots
from densegrpo.run.hooks.diagnostics import read_metrics
from densegrpo.run.hooks.metrics import METRICS
from densegrpo.run.monitors import logged_monitors
from densegrpo.run.runs import CONFIG_FILE

REPORT = "report.html"


@dataclass
class RunFolder:
    """What a run folder holds: its metrics rows, ``summary.json`` (``None`` while it trains or
    after a kill) and the iterations its ``config.yaml`` asks for (``None`` without one)."""

    path: Path
    rows: list[dict[str, Any]]
    summary: dict[str, Any] | None
    planned: int | None

    @property
    def status(self) -> str:
        if self.summary is None:
            return "running, or killed (no summary.json)"
        if self.summary.get("stopped_by"):
            return f"stopped by {self.summary['stopped_by']}; continue with --resume"
        return "finished"


def load_run(run_dir: Path) -> RunFolder:
    """Read ``run_dir``; a missing folder, or one without an iteration in ``metrics.jsonl``,
    is a one-line :class:`~densegrpo.contracts.errors.UserError`."""
    run_dir = Path(run_dir)
    hint = "pass the folder `densegrpo train --out` wrote"
    if not run_dir.exists():
        raise UserError(f"run folder '{run_dir}' does not exist; {hint}")
    if not run_dir.is_dir():
        raise UserError(f"'{run_dir}' is a file, not a run folder; {hint}")
    if not (run_dir / METRICS).exists():
        raise UserError(f"'{run_dir}' has no {METRICS}, so it is no run folder or its run has not finished an iteration yet; {hint}")
    rows = read_metrics(run_dir)
    if not rows:
        raise UserError(f"'{run_dir / METRICS}' holds no iteration yet; wait for the first one, or {hint}")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.exists() else None
    planned = None
    if (run_dir / CONFIG_FILE).exists():
        config = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8")) or {}
        planned = config.get("iterations") if isinstance(config, dict) else None
    return RunFolder(run_dir, rows, summary, planned)


def _number(value: Any, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _last(rows: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in reversed(rows) if key in r), None)


def _first(rows: list[dict[str, Any]], key: str) -> Any:
    return next((r[key] for r in rows if key in r), None)


def _gain(rows: list[dict[str, Any]], prefix: str) -> str:
    gain, se = _last(rows, f"{prefix}_gain"), _last(rows, f"{prefix}_gain_se")
    return "-" if gain is None else f"{gain:+.4f} ± {_number(se)}"


def summary_table(run: RunFolder) -> list[tuple[str, str]]:
    """``(quantity, value)`` rows: progress, rewards (training, evaluation, monitors, with the
    final paired gains), warnings, compute."""
    rows = run.rows
    last = rows[-1]
    done = last["iteration"] + 1
    table = [
        ("status", run.status),
        ("iterations", f"{done} of {run.planned}" if run.planned is not None else str(done)),
        ("train reward, first -> last", f"{_number(rows[0]['reward_mean'])} -> {_number(last['reward_mean'])}"),
    ]
    for prefix, name in (("eval", "eval reward (held-out)"), ("train_eval", "train-prompt eval reward")):
        if _first(rows, f"{prefix}_reward") is None and _first(rows, f"{prefix}_reward_base") is None:
            continue
        table.append((f"{name}, base -> last", f"{_number(_first(rows, f'{prefix}_reward_base'))} -> {_number(_last(rows, f'{prefix}_reward'))}"))
        table.append((f"{name}, paired gain", _gain(rows, prefix)))
    for label in logged_monitors(rows):
        prefix = f"monitor_{label}"
        table.append((f"monitor {label}, base -> last", f"{_number(_first(rows, f'{prefix}_reward_base'))} -> {_number(_last(rows, f'{prefix}_reward'))}"))
        table.append((f"monitor {label}, paired gain", _gain(rows, prefix)))
    warned = [r["iteration"] for r in rows if r.get("reward_hacking")]
    if logged_monitors(rows):
        table.append(("reward-hacking warnings", f"{len(warned)} (iterations {', '.join(str(i) for i in warned)})" if warned else "0"))
    table += [
        ("NFE, total", _number(last.get("nfe_total"))),
        ("training compute (wall_s)", _number(last.get("wall_s"), 1)),
        ("elapsed (s)", _number(last.get("elapsed_s"), 1)),
    ]
    return table


def print_table(run: RunFolder) -> None:
    """The summary table on the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"densegrpo run {run.path}")
    table.add_column("quantity")
    table.add_column("value")
    for name, value in summary_table(run):
        table.add_row(name, value)
    Console().print(table)


def _embedded(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def pictures(run: RunFolder, scratch: Path) -> list[tuple[str, Path]]:
    """``(title, PNG)`` of the page: curves and diagnostics drawn afresh from the rows (into
    ``scratch``, so the run folder is left alone), calibration, first and latest grids."""
    out = [("Reward", plots.plot_reward_curve(run.rows, scratch / "reward_curve.png")),
           ("Per-step diagnostics", plots.plot_step_diagnostics(run.rows, scratch / "step_diagnostics.png"))]
    if (run.path / "calibration.png").exists():
        out.append(("Calibration", run.path / "calibration.png"))
    grids = sorted((run.path / "samples").glob("iter-*.png")) if (run.path / "samples").exists() else []
    for grid in dict.fromkeys([*grids[:1], *grids[-1:]]):
        out.append((f"Samples after {int(grid.stem.split('-')[1])} iterations (ODE, test prompts)", grid))
    return out


def write_report(run: RunFolder, out: Path) -> Path:
    """One HTML page at ``out``: the summary table and :func:`pictures`, the images embedded."""
    with tempfile.TemporaryDirectory() as scratch:
        figures = [(title, _embedded(path)) for title, path in pictures(run, Path(scratch))]
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(v)}</td></tr>" for k, v in summary_table(run))
    body = "".join(f"<h2>{html.escape(title)}</h2><img src='{src}' alt='{html.escape(title)}'>" for title, src in figures)
    page = (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>densegrpo report: {html.escape(run.path.name)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse}"
        "td{border:1px solid #ccc;padding:4px 10px}img{max-width:100%;border:1px solid #eee}</style></head><body>"
        f"<h1>densegrpo run {html.escape(str(run.path))}</h1><table>{rows}</table>{body}</body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out


def report_from_cli(run_dir: Path, out: Path | None) -> Path:
    """``densegrpo report``: print the table, write the page (default ``RUN_DIR/report.html``)."""
    run = load_run(run_dir)
    print_table(run)
    return write_report(run, Path(out) if out else Path(run_dir) / REPORT)
