"""Weights & Biases logging (``logging.wandb``, the ``densegrpo[wandb]`` extra): the run config,
every metrics record, the sample grids and, at the end, the reward curve and the summary.

Per-step lists (``noise_level``, ``dense_gain_mean``, ``grad_norm_per_step``, ...) become one
series per step, ``<key>/step_<k>``, so W&B can chart them against the iteration. A resumed
run continues the same W&B run (its id is kept in ``RUN/wandb_run.json``); W&B drops the
iterations redone after the checkpoint, since its steps only go forward.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densegrpo.contracts.config import WandbConfig
from densegrpo.contracts.errors import UserError
from densegrpo.run.hooks.diagnostics import DIAGNOSTICS

if TYPE_CHECKING:
    from densegrpo.run.state import Run

RUN_ID = "wandb_run.json"
"""The W&B run id of a run folder, so a resume logs to the same W&B run."""
PICTURES = {"reward_curve": "reward_curve.png", "step_diagnostics": DIAGNOSTICS, "calibration": "calibration.png"}
"""The run's PNG pages logged as images at the end, by W&B key."""


def import_wandb() -> Any:
    """The ``wandb`` module, or a one-line :class:`~densegrpo.contracts.errors.UserError` saying how to install it."""
    try:
        import wandb
    except ImportError:
        raise UserError(
            "logging.wandb.enabled=true needs the wandb package: pip install 'densegrpo[wandb]' "
            "(or set logging.wandb.enabled=false)"
        ) from None
    return wandb


def flatten_record(record: dict[str, Any]) -> dict[str, float | int]:
    """A metrics record as W&B scalars: numbers as they are, a per-step list as ``<key>/step_<k>``;
    ``None``, NaN, infinities, strings and the iteration index (W&B's step) are left out."""
    out: dict[str, float | int] = {}
    for key, value in record.items():
        if key == "iteration":
            continue
        items = enumerate(value) if isinstance(value, list) else [(None, value)]
        for k, item in items:
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                continue
            out[key if k is None else f"{key}/step_{k}"] = item
    return out


def summary_scalars(summary: dict[str, Any]) -> dict[str, Any]:
    """The numbers and strings of a run's ``summary`` (W&B's summary panel)."""
    return {k: v for k, v in summary.items() if isinstance(v, (str, int, float)) and not (isinstance(v, float) and not math.isfinite(v))}


class WandbHook:
    """Rank 0 logs to one W&B run; imported when built, so a missing wandb fails before training."""

    def __init__(self, config: WandbConfig) -> None:
        self.config = config
        self.wandb = import_wandb()
        self.run: Any = None
        self.samples_logged: set[str] = set()

    def before_training(self, run: "Run") -> None:
        if not run.world.is_main:
            return
        options = self.config
        id_path = run.run_dir / RUN_ID
        run_id = json.loads(id_path.read_text(encoding="utf-8"))["id"] if id_path.exists() else uuid.uuid4().hex[:8]
        directory = options.dir or os.environ.get("WANDB_DIR") or str(run.run_dir)
        Path(directory).mkdir(parents=True, exist_ok=True)
        self.run = self.wandb.init(
            project=options.project,
            entity=options.entity,
            name=options.name or run.run_dir.name,
            group=options.group,
            tags=options.tags or None,
            mode=options.mode,
            dir=directory,
            id=run_id,
            resume="allow",
            config=run.config.model_dump(mode="json"),
        )
        id_path.write_text(json.dumps({"id": run_id}), encoding="utf-8")
        # a resumed run logged its earlier grids already; a fresh one has only the grid of the base policy
        earlier = sorted((run.run_dir / "samples").glob("iter-*.png")) if run.iteration and (run.run_dir / "samples").exists() else []
        self.samples_logged = {p.name for p in earlier}

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        if self.run is None:
            return
        step = int(record["iteration"])
        data: dict[str, Any] = flatten_record(record)
        if run.due(run.config.logging.sample_every):
            data.update(self._new_grids(run))
        self.run.log(data, step=step)

    def _new_grids(self, run: "Run") -> dict[str, Any]:
        """The sample grids (``samples/*.png``) not yet logged, as one ``samples`` image list."""
        folder = run.run_dir / "samples"
        new = [p for p in sorted(folder.glob("iter-*.png")) if p.name not in self.samples_logged] if folder.exists() else []
        self.samples_logged.update(p.name for p in new)
        if not new:
            return {}
        return {"samples": [self.wandb.Image(str(p), caption=p.stem) for p in new]}

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        if self.run is None:
            return
        pictures = {key: self.wandb.Image(str(run.run_dir / name)) for key, name in PICTURES.items() if (run.run_dir / name).exists()}
        if pictures:  # at the last iteration's step, beside its metrics
            self.run.log(pictures, step=max(run.iteration - 1, 0))
        self.run.summary.update(summary_scalars(summary))
        self.run.finish(exit_code=1 if summary.get("stopped_by") else 0)
        self.run = None
