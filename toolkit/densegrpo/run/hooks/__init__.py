"""Bookkeeping around the GRPO iteration, one hook per file.

A hook is any object with the three methods of :class:`Hook` (a protocol: no base class to
inherit). The run calls, for every hook in order:

* ``before_training(run)`` once, after a resume has restored the checkpoint;
* ``after_iteration(run, record)`` after each iteration, with its metrics ``record`` (a dict
  a hook may add keys to; ``run.result`` holds the iteration's scores);
* ``after_training(run, summary)`` once, with the run's ``summary`` dict (a hook may add keys);
  also when a signal stops the run early (:mod:`densegrpo.run.preemption`), with
  ``summary["stopped_by"]`` naming the signal.

The order is: calibration, evaluation (with the monitor rewards), sample grids, then the
hooks a user adds (``hooks:`` in the config, or ``run_training(..., hooks=[...])``), then
metrics, TensorBoard, per-step diagnostics, Weights & Biases, checkpoints and progress, so a
user hook's keys reach ``metrics.jsonl`` (and W&B) and a checkpoint is written only after its
iteration's metrics line. Each hook owns its share of the totals:
calibration adds its rounds' NFE and seconds; evaluation and pictures count only in
``elapsed_s``. Writing a hook: CONTRIBUTING.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from densegrpo.contracts.config import RunConfig
    from densegrpo.run.state import Run


@runtime_checkable
class Hook(Protocol):
    """Bookkeeping the run calls around its iterations (see the module docstring)."""

    def before_training(self, run: "Run") -> None:
        """Once, before the first iteration of this process (fresh or resumed)."""
        ...

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        """After iteration ``record["iteration"]``; ``run.iteration`` is already the next index."""
        ...

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        """Once, after the last iteration of this process (also after a stop by a signal:
        ``summary["stopped_by"]`` then names it)."""
        ...


def run_hooks(config: "RunConfig", extra: list[Any]) -> list[Any]:
    """The hooks of a run, in the order of the module docstring."""
    from densegrpo.contracts import registry
    from densegrpo.contracts.protocols import conform
    from densegrpo.run.hooks.calibration import CalibrationHook
    from densegrpo.run.hooks.checkpoints import CheckpointHook
    from densegrpo.run.hooks.diagnostics import StepDiagnosticsHook
    from densegrpo.run.hooks.evaluation import EvaluationHook
    from densegrpo.run.hooks.metrics import MetricsHook
    from densegrpo.run.hooks.progress import ProgressHook
    from densegrpo.run.hooks.samples import SampleGridHook
    from densegrpo.run.hooks.tensorboard import TensorBoardHook
    from densegrpo.run.hooks.weights_and_biases import WandbHook

    configured = [conform("hooks", registry.load("hooks", spec.name, spec.config)) for spec in config.hooks]
    user = configured + [conform("hooks", hook) for hook in extra]
    logging = config.logging
    after = [
        MetricsHook(),
        *([TensorBoardHook()] if logging.tensorboard else []),
        *([StepDiagnosticsHook()] if logging.step_diagnostics else []),
        *([WandbHook(logging.wandb)] if logging.wandb.enabled else []),
        CheckpointHook(),
        ProgressHook(),
    ]
    return [CalibrationHook(), EvaluationHook(), SampleGridHook(), *user, *after]
