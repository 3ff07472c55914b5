"""A training run: the state a run carries, and its loop, which calls
:func:`densegrpo.grpo.iteration` and then the hooks (:mod:`densegrpo.hooks`) that keep the
books: calibration, evaluation, sample grids, metrics, TensorBoard, checkpoints, progress.
"""

from __future__ import annotations

import signal
import time
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import torch

from densegrpo import checkpoint as ckpt
from densegrpo import config as cfg
from densegrpo.batches import TRAIN_STREAM, Batch, PromptBatches, prompt_metadata
from densegrpo.build import Components, build, conformed
from densegrpo.distributed import DataParallel, World, init_world, shutdown
from densegrpo.ema import WeightAverage
from densegrpo.errors import UserError
from densegrpo.evaluate import load_prompt_records
from densegrpo.grpo import IterationResult, Learner, iteration, local_minibatch
from densegrpo.noise import generator_for
from densegrpo.preemption import Preempted, Preemption
from densegrpo.reward_scorer import RewardScorer
from densegrpo.rewarding import num_trained_steps, plan_scoring
from densegrpo.runs import default_run_dir, load_run_config, save_run_config, writer_lock
from densegrpo.sigmas import make_sigmas

NFE_KEYS = ("nfe_rollout", "nfe_dense", "nfe_train", "nfe_calibration")


class Run:
    """One training run's state, shared by its loop and its hooks.

    Attributes:
        config, run_dir, world: what the run was started with.
        parts: the built components; ``learner``: what :func:`~densegrpo.grpo.iteration` updates.
        train_records, test_records: the prompt sets; ``batches`` draws from the training set.
        iteration: iterations done (the next one's index).
        checkpointed: the ``iteration`` of the newest checkpoint this process wrote or loaded,
            or ``None``.
        totals: running sums: ``wall_s`` (training compute: calibration, rollouts, rewards and
            updates, without evaluation or pictures, so budgets compare methods fairly),
            ``elapsed_s`` (everything) and the NFE counts of :data:`NFE_KEYS`.
        ema: the weight average used for evaluation, or ``None``.
        result: the last iteration's :class:`~densegrpo.grpo.IterationResult` (for hooks).
    """

    def __init__(self, config: cfg.RunConfig, run_dir: Path, world: World | None = None, components: Components | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.world = world or World()
        # Prompts and component names are checked before any weights load (minutes for SD3).
        self.train_records = load_prompt_records(config.prompts.train)
        self.test_records = load_prompt_records(config.prompts.test)
        if not self.train_records:
            raise UserError(f"no training prompts in '{config.prompts.train}'; point prompts.train at a non-empty file")
        if components is None:
            cfg.validate_components(config)
        torch.manual_seed(config.seed)
        self.parts = conformed(components) if components is not None else build(config)
        self.parts.calibrator.limit_noise_level(*self.parts.sampler.noise_level_range)
        self.policy = self.parts.policy
        t = config.train
        sigmas = make_sigmas(config.sampling.num_steps, config.sampling.shift)
        # DDP/FSDP before the optimizer: FSDP replaces the parameters by sharded ones.
        parallel = DataParallel(self.world, t.data_parallel)
        parallel.attach(self.policy)
        optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=t.learning_rate, betas=tuple(t.adam_betas), weight_decay=t.weight_decay
        )
        self.learner = Learner(self.policy, self.parts.sampler, self.parts.advantage, optimizer, parallel, t, sigmas)
        self.ema = WeightAverage(self.policy, t.ema_decay) if t.ema_decay > 0 else None
        self.batches = PromptBatches(self.train_records, config.seed, self.world, tuple(self.policy.latent_shape), config.sampling.num_steps)
        self.global_batch = t.group_size * t.groups_per_iteration
        local_minibatch(t.minibatch_size, self.global_batch, self.world.world_size)  # fail before the first rollout
        needs = self.parts.advantage.needs
        self.plans = {calibrating: plan_scoring(needs, calibrating) for calibrating in (False, True)}
        self.iteration = 0
        self.checkpointed: int | None = None
        self.totals: dict[str, float] = {"wall_s": 0.0, "elapsed_s": 0.0, **{key: 0 for key in NFE_KEYS}}
        self.result: IterationResult | None = None
        self.warned_zero_noise = False
        self._started = time.perf_counter()
        self._elapsed_before = 0.0

    @property
    def sigmas(self) -> torch.Tensor:
        """``(T+1,)`` the training grid."""
        return self.learner.sigmas

    @property
    def shares_rank0_work(self) -> bool:
        """Whether this rank takes part in rank 0's work (checkpoints, evaluation, sample grids):
        rank 0 itself, or every rank when weights are sharded (FSDP), where gathering the weights
        and every forward pass are collective."""
        return self.world.is_main or self.learner.parallel.sharded

    @property
    def finished(self) -> bool:
        return self.iteration >= self.config.iterations

    def due(self, every: int) -> bool:
        """After an iteration: the last one, or every ``every``-th (0: only the last)."""
        return self.finished or bool(every and self.iteration % every == 0)

    def calibrating(self, index: int) -> bool:
        """Whether the calibrator also learns from iteration ``index`` (``calibration.online_every``)."""
        every = self.config.calibration.online_every
        return bool(every) and (index + 1) % every == 0

    def scorer(self, batch: Batch) -> RewardScorer:
        return RewardScorer(self.parts.rewards, batch.prompts, batch.metadata)

    def records_scorer(self, records: list[dict[str, Any]]) -> RewardScorer:
        return RewardScorer(self.parts.rewards, [r["prompt"] for r in records], [prompt_metadata(r) for r in records])

    def evaluation_weights(self) -> ContextManager[Any]:
        """The weights evaluation and sample grids use: the EMA's when enabled."""
        return self.ema.swapped_in(self.policy) if self.ema is not None else nullcontext()

    def elapsed(self) -> float:
        """Seconds of this run so far, over every process that worked on it (resumes add up)."""
        return self._elapsed_before + (time.perf_counter() - self._started)

    def resumed_from(self, elapsed_s: float) -> None:
        """Continue the clock of a checkpoint that had run ``elapsed_s`` seconds."""
        self._elapsed_before = elapsed_s
        self._started = time.perf_counter()


def train_step(run: Run) -> dict[str, Any]:
    """Iteration ``run.iteration`` and its share of the totals; returns its metrics record."""
    index, t = run.iteration, run.config.train
    batch = run.batches.draw(index, TRAIN_STREAM, t.groups_per_iteration, t.group_size, t.same_noise_per_group)
    noise_level = run.parts.calibrator.noise_level(run.sigmas)
    plan = run.plans[run.calibrating(index)]
    run.result = iteration(run.learner, batch, noise_level, plan, run.scorer(batch), generator_for(run.config.seed, TRAIN_STREAM, index))
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
    built-in hooks that write metrics and checkpoints (see :func:`densegrpo.hooks.run_hooks`).

    A SIGTERM or SIGINT ends the iteration under way, writes a checkpoint and raises
    :class:`~densegrpo.preemption.Preempted` (see :mod:`densegrpo.preemption`).
    """
    world = init_world()
    try:
        summary = _train(config, Path(run_dir), resume, world, components, hooks or [], fallback)
        world.barrier()  # every rank is done before the process group goes away
        return summary
    finally:
        shutdown(world)


def _train(config: cfg.RunConfig, run_dir: Path, resume: bool, world: World, components: Components | None,
           extra_hooks: list[Any], fallback: bool = False) -> dict[str, Any]:
    from densegrpo.hooks import checkpoints, run_hooks

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
