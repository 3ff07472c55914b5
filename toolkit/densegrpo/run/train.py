"""A training run's loop, which calls
:func:`densegrpo.method.grpo.iteration` and then the hooks (:mod:`densegrpo.run.hooks`) that keep the
books: calibration, evaluation, sample grids, metrics, TensorBoard, checkpoints, progress.
"""

from __future__ import annotations

import signal
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError
from densegrpo.method.distributed import World, init_world, shutdown
from densegrpo.method.grpo import iteration
from densegrpo.method.noise import generator_for
from densegrpo.method.rewarding import num_trained_steps
from densegrpo.run import checkpoint as ckpt
from densegrpo.run.batches import TRAIN_STREAM
from densegrpo.run.build import Components
from densegrpo.run.preemption import Preempted, Preemption
from densegrpo.run.runs import (
    default_run_dir,
    load_run_config,
    save_run_config,
    writer_lock,
)
from densegrpo.run.state import NFE_KEYS, Run

# The minibatch order's key under (seed, TRAIN_STREAM, iteration), beside draw_noise's 0 (initial
# noise) and 1 (step noise): it depends on nothing else, so a resumed run shuffles as the uninterrupted one.
MINIBATCH_ORDER = 2


def train_step(run: Run) -> dict[str, Any]:
    """Iteration ``run.iteration`` and its share of the totals; returns its metrics record."""
    index, t = run.iteration, run.config.train
    batch = run.batches.draw(index, TRAIN_STREAM, t.groups_per_iteration, t.group_size, t.same_noise_per_group)
    noise_level = run.parts.calibrator.noise_level(run.sigmas)
    plan = run.plans[run.calibrating(index)]
    generator = generator_for(run.config.seed, TRAIN_STREAM, index)
    order_keys = (run.config.seed, TRAIN_STREAM, index, MINIBATCH_ORDER)  # train.shuffle_minibatches
    run.result = iteration(run.learner, batch, noise_level, plan, run.scorer(batch), generator, order_keys=order_keys)
    if run.ema is not None:
        run.ema.update(run.policy)
    run.iteration = index + 1
    record = {"iteration": index, **run.result.numbers}
    run.totals["nfe_calibration"] += run.result.scores.nfe_calibration
    for key in ("nfe_rollout", "nfe_dense", "nfe_train"):
        run.totals[key] += record[key]
    record["nfe"] = record["nfe_rollout"] + record["nfe_dense"] + record["nfe_train"]
    record["nfe_total"] = sum(run.totals[key] for key in NFE_KEYS)
    run.totals["wall_s"] += record["iteration_s"]
    warn_zero_noise_once(run, record)
    return record


def warn_zero_noise_once(run: Run, record: dict[str, Any]) -> None:
    """One warning per run when a step the loss would train got noise level 0 (an Euler step
    without a log-prob): the metric ``untrained_zero_noise_steps`` counts them every iteration."""
    if run.warned_zero_noise or not record["untrained_zero_noise_steps"] or not run.world.is_main:
        return
    run.warned_zero_noise = True
    levels = run.result.noise_level.tolist()
    steps = [k for k in range(num_trained_steps(len(levels), run.config.train.timestep_fraction)) if levels[k] == 0]
    warnings.warn(
        f"iteration {record['iteration']}: noise level 0 at step(s) {steps}, so they are Euler ODE steps that the loss "
        "does not train (logged as untrained_zero_noise_steps); raise the calibrator's lower bound above 0 (reward-aware: "
        "calibrator.config.clamp) to keep them trained",
        stacklevel=2,
    )


def run_training(config: cfg.RunConfig, run_dir: Path, resume: bool = False, components: Components | None = None,
                 hooks: list[Any] | None = None, fallback: bool = False) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; with ``resume``, continue from its latest checkpoint
    (a damaged one stops the run; with ``fallback`` too, the newest intact one is used).

    ``hooks`` are added to the configured ones (``config.hooks``), in order, before the
    built-in hooks that write metrics and checkpoints (see :func:`densegrpo.run.hooks.run_hooks`).

    A SIGTERM or SIGINT ends the iteration under way, writes a checkpoint and raises
    :class:`~densegrpo.run.preemption.Preempted` (see :mod:`densegrpo.run.preemption`).
    """
    world = init_world(config.collective_timeout_s)
    try:
        summary = _train(config, Path(run_dir), resume, world, components, hooks or [], fallback)
        world.barrier()  # every rank is done before the process group goes away
        return summary
    finally:
        shutdown(world)


def _train(config: cfg.RunConfig, run_dir: Path, resume: bool, world: World, components: Components | None,
           extra_hooks: list[Any], fallback: bool = False) -> dict[str, Any]:
    from densegrpo.run.hooks import checkpoints, run_hooks

    # Only rank 0 writes the folder, so only it takes the lock; a refused rank 0 exits and the
    # launcher stops the other ranks.
    with writer_lock(run_dir) if world.is_main else nullcontext():
        if world.is_main and not resume and (run_dir / "metrics.jsonl").exists():
            raise UserError(f"'{run_dir}' already holds a run; pass --resume {run_dir} to continue it or choose another --out")
        hooks = run_hooks(config, extra_hooks)  # before the weights load: a hook missing its package fails at once
        run = Run(config, run_dir, world, components)
        if resume:
            checkpoints.restore_latest(run, fallback)
        if world.is_main:  # after the checkpoint loaded: a resume that fails leaves the folder as it was
            save_run_config(run_dir, config)
        # From here on SIGTERM/SIGINT end the iteration under way, checkpoint and stop.
        with Preemption(run_dir) as preemption:
            for hook in hooks:
                hook.before_training(run)
            while not run.finished and not preemption.requested(world):
                record = train_step(run)
                for hook in hooks:
                    hook.after_iteration(run, record)
            stopped = preemption.received if not run.finished else None
            written = stopped is not None and bool(run.iteration) and run.checkpointed != run.iteration
            if written:
                checkpoints.save_checkpoint(run)
                world.barrier()
            summary: dict[str, Any] = {"run_dir": str(run_dir), "iterations": run.iteration, **run.totals}
            if stopped is not None:
                summary["stopped_by"] = signal.Signals(stopped).name
            for hook in hooks:  # also on a stop: summary, curves, progress bar and TensorBoard are closed off
                hook.after_training(run, summary)
    if stopped is not None:
        folder = ckpt.folder_for(run_dir, run.iteration) if run.iteration else None
        raise Preempted(stopped, run_dir, run.iteration, config.iterations, folder, written, summary)
    return summary


def train_from_cli(config_path: Path | None, overrides: list[str], out: Path | None, resume: Path | None,
                   fallback: bool = False) -> dict[str, Any]:
    if fallback and resume is None:
        raise UserError("--fallback only goes with --resume RUN_DIR")
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise UserError("pass either --resume RUN_DIR or --out DIR, not both")
        config = load_run_config(resume, overrides) if config_path is None else cfg.resolve(config_path, overrides)
        return run_training(config, Path(resume), resume=True, fallback=fallback)
    config = cfg.resolve(config_path, overrides)
    return run_training(config, Path(out) if out else default_run_dir())
