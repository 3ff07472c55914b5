"""The state of one training run, shared by its loop (:mod:`densegrpo.run.train`) and its hooks
(:mod:`densegrpo.run.hooks`), which read and update it; it imports neither."""

from __future__ import annotations

import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, ContextManager

import torch

from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError
from densegrpo.method.batch import Batch
from densegrpo.method.distributed import DataParallel, World
from densegrpo.method.grpo import IterationResult, Learner, local_minibatch
from densegrpo.method.reward_scorer import RewardScorer
from densegrpo.method.rewarding import plan_scoring
from densegrpo.method.sigmas import make_sigmas
from densegrpo.run.batches import PromptBatches, prompt_metadata
from densegrpo.run.build import Components, build, conformed
from densegrpo.run.ema import WeightAverage
from densegrpo.run.evaluate import load_prompt_records

NFE_KEYS = ("nfe_rollout", "nfe_dense", "nfe_train", "nfe_calibration")


def set_tf32(enabled: bool) -> None:
    """``tf32``: let (or forbid) CUDA float32 matmuls (cuBLAS) and convolutions (cuDNN) run on TF32 tensor
    cores, a 10-bit mantissa in the products with float32 accumulation. Flow-GRPO's train_sd3.py turns the
    matmul flag on (``config.allow_tf32``); cuDNN's is on by torch's default, so ``tf32: true`` is its
    setting. They are process-wide and read only by CUDA kernels: a CPU run is unchanged."""
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


class Run:
    """One training run's state, shared by its loop and its hooks.

    Attributes:
        config, run_dir, world: what the run was started with.
        parts: the built components; ``learner``: what :func:`~densegrpo.method.grpo.iteration` updates.
        train_records, test_records: the prompt sets; ``batches`` draws from the training set.
        iteration: iterations done (the next one's index).
        checkpointed: the ``iteration`` of the newest checkpoint this process wrote or loaded,
            or ``None``.
        totals: running sums: ``wall_s`` (training compute: calibration, rollouts, rewards and
            updates, without evaluation or pictures, so budgets compare methods fairly),
            ``elapsed_s`` (everything) and the NFE counts of :data:`NFE_KEYS`.
        ema: the weight average used for evaluation, or ``None``.
        result: the last iteration's :class:`~densegrpo.method.grpo.IterationResult` (for hooks).
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
        set_tf32(config.tf32)  # before any model runs: process-wide flags, read by CUDA kernels only
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
        self.learner = Learner(self.policy, self.parts.sampler, self.parts.advantage, optimizer, parallel, t, sigmas,
                               chunk_size=config.sampling.chunk_size)
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
