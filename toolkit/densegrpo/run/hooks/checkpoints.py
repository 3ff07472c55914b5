"""Checkpoints every ``checkpoint_every`` iterations and at the end, and exact resume."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from densegrpo.run import checkpoint as ckpt

if TYPE_CHECKING:
    from densegrpo.run.state import Run


def save_checkpoint(run: "Run") -> None:
    """Rank 0 writes the checkpoint; with sharded weights (FSDP) every rank first helps gather them."""
    run.checkpointed = run.iteration
    if not run.shares_rank0_work:
        return
    parallel = run.learner.parallel
    trainable = run.policy.trainable_state_dict()
    optimizer = parallel.optimizer_state_dict(run.learner.optimizer)
    if not run.world.is_main:
        return
    state = {
        "iteration": run.iteration,
        "totals": run.totals,
        "calibrator": run.parts.calibrator.state_dict(),
        "seed": run.config.seed,
        "world_size": run.world.world_size,
    }
    ema = run.ema.state if run.ema is not None else None
    ckpt.save(run.run_dir, run.iteration, ckpt.Checkpoint(trainable, optimizer, state, ema))


def restore_latest(run: "Run", fallback: bool = False) -> None:
    """Continue from ``run``'s latest checkpoint, if it has one. A damaged one stops the run
    (:class:`~densegrpo.contracts.errors.CheckpointError`); with ``fallback``, the newest intact one is used."""
    found = ckpt.load_latest(run.run_dir, map_location=run.policy.device, fallback=fallback)
    if found is not None:
        apply(run, found[1])


def restore(run: "Run", folder: Path) -> None:
    """Load checkpoint ``folder`` into ``run`` (see :func:`apply`)."""
    apply(run, ckpt.load(folder, map_location=run.policy.device))


def apply(run: "Run", saved: ckpt.Checkpoint) -> None:
    """Put a loaded checkpoint into ``run``: weights, optimizer, EMA, iteration, totals, clock
    and calibrator."""
    run.policy.load_trainable_state_dict(saved.trainable)
    run.learner.parallel.load_optimizer_state_dict(run.learner.optimizer, saved.optimizer)
    if saved.ema is not None and run.ema is not None:
        run.ema.load(saved.ema)
    run.iteration = int(saved.state["iteration"])
    run.checkpointed = run.iteration
    run.totals.update(saved.state.get("totals", {}))
    run.resumed_from(run.totals["elapsed_s"])
    if saved.state.get("calibrator") is not None:
        run.parts.calibrator.load_state_dict(saved.state["calibrator"])


class CheckpointHook:
    """Saves after the metrics of the iteration are written, so a checkpoint never runs ahead of them."""

    def before_training(self, run: "Run") -> None:
        pass

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        if run.due(run.config.checkpoint_every):
            save_checkpoint(run)
            run.world.barrier()

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        pass
