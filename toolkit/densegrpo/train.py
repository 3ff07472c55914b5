"""Bookkeeping around the GRPO loop: run folders, calibration rounds, metrics, plots,
checkpoints and exact resume. The algorithm itself is :mod:`densegrpo.grpo`.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from densegrpo import checkpoint as ckpt
from densegrpo import config as cfg
from densegrpo import plots
from densegrpo.build import Components, build
from densegrpo.dense import DenseRewardEngine
from densegrpo.distributed import DataParallel, World, init_world, shutdown
from densegrpo.errors import UserError
from densegrpo.evaluate import generate, load_prompt_records, paired_gain
from densegrpo.grpo import (
    Batch,
    RewardScorer,
    calibration_stats,
    compute_advantages,
    dense_gain_stats,
    local_minibatch,
    rollout_and_score,
    update_policy,
)
from densegrpo.images import make_grid, save_png
from densegrpo.noise import draw_noise, generator_for
from densegrpo.runs import default_run_dir, load_run_config, save_run_config
from densegrpo.sigmas import make_sigmas

TRAIN_STREAM, CALIBRATION_STREAM = 1, 2
METRICS = "metrics.jsonl"
EVALUATIONS = {"eval": "test", "train_eval": "train"}
"""Metric prefix -> prompt split of each evaluation a run logs."""
EVAL_BASE = {"eval": "eval_base.json", "train_eval": "train_eval_base.json"}
"""Per-image rewards of the untrained policy, by evaluation, kept so a resumed run still logs its gains."""


def calibration_rounds(calibrator: Any) -> int:
    """Rounds a calibrator runs before training (0 for fixed schedules such as `uniform`)."""
    return int(getattr(getattr(calibrator, "config", None), "max_rounds", 0) or 0)


def calibration_samples(calibrator: Any, default: int) -> int:
    return int(getattr(getattr(calibrator, "config", None), "samples_per_round", 0) or default)


def completion_for(estimator: Any) -> int | str:
    needs = getattr(estimator, "needs", None)
    return needs.completion if needs is not None and needs.dense else "t"


class Trainer:
    """One GRPO run: owns the components, the optimizer and the run folder."""

    def __init__(self, config: cfg.RunConfig, run_dir: Path, world: World | None = None, components: Components | None = None):
        self.config = config
        self.run_dir = Path(run_dir)
        self.world = world or World()
        torch.manual_seed(config.seed)
        self.parts = components or build(config)
        self.policy = self.parts.policy
        self.train_records = load_prompt_records(config.prompts.train)
        self.test_records = load_prompt_records(config.prompts.test)
        if not self.train_records:
            raise UserError(f"no training prompts in '{config.prompts.train}'; point prompts.train at a non-empty file")
        self.sigmas = make_sigmas(config.sampling.num_steps, config.sampling.shift)
        t = config.train
        # DDP/FSDP before the optimizer: FSDP replaces the parameters by sharded ones.
        self.parallel = DataParallel(self.world, t.data_parallel)
        self.parallel.attach(self.policy)
        self.optimizer = torch.optim.AdamW(
            self.policy.trainable_parameters(), lr=t.learning_rate, betas=tuple(t.adam_betas), weight_decay=t.weight_decay
        )
        needs = getattr(self.parts.advantage, "needs", None)
        self.estimator_is_dense = bool(needs and needs.dense)
        # a step-local estimator reads only the trained steps' states (RewardNeeds.step_local)
        self.estimator_is_step_local = bool(needs and needs.dense and needs.step_local)
        self.engine = DenseRewardEngine(completion=completion_for(self.parts.advantage))
        self.ema = {k: v.detach().clone() for k, v in self.policy.trainable_state_dict().items()} if t.ema_decay > 0 else None
        self.iteration = 0
        self.totals = {"wall_s": 0.0, "elapsed_s": 0.0, "nfe_rollout": 0, "nfe_dense": 0, "nfe_train": 0, "nfe_calibration": 0}
        self.global_batch = t.group_size * t.groups_per_iteration
        local_minibatch(t.minibatch_size, self.global_batch, self.world.world_size)  # fail before the first rollout
        self.per_reward = config.reward_combine == "sum-advantages" and len(config.rewards) > 1

    # ---- batches ---------------------------------------------------------------------
    def make_batch(self, iteration: int, stream: int, groups: int, group_size: int, same_noise: bool) -> Batch:
        """Prompt groups for ``iteration`` (seeded by (seed, stream, iteration)) and this rank's shard."""
        rng = np.random.default_rng([self.config.seed, stream, iteration])
        picks = rng.choice(len(self.train_records), size=groups, replace=len(self.train_records) < groups)
        records = [self.train_records[int(i)] for i in picks for _ in range(group_size)]
        total = len(records)
        shard = self.world.shard(total)
        indices = list(range(total))[shard]
        noise, step_noise = draw_noise(
            self.config.seed,
            iteration,
            indices,
            tuple(self.policy.latent_shape),
            self.config.sampling.num_steps,
            group_size=group_size if same_noise else None,
            stream=stream,
        )
        local = records[shard]
        return Batch(
            prompts=[r["prompt"] for r in local],
            metadata=[r if "include" in r else None for r in local],
            noise=noise,
            step_noise=step_noise,
            global_size=total,
        )

    def scorer(self, batch: Batch, per_reward: bool = False) -> RewardScorer:
        return RewardScorer(self.parts.rewards, batch.prompts, batch.metadata, per_reward=per_reward)

    # ---- calibration -----------------------------------------------------------------
    def calibrate(self, rounds: int | None = None, log: Any = None) -> list[dict[str, Any]]:
        """DenseGRPO Algorithm 1: N fresh-prompt SDE rollouts per round, dense gains, update psi."""
        calibrator = self.parts.calibrator
        rounds = calibration_rounds(calibrator) if rounds is None else rounds
        samples = calibration_samples(calibrator, self.global_batch)
        samples -= samples % self.world.world_size
        history = []
        engine = DenseRewardEngine(completion="t")
        for round_index in range(rounds):
            noise_level = calibrator.noise_level(self.sigmas)
            batch = self.make_batch(round_index, CALIBRATION_STREAM, groups=samples, group_size=1, same_noise=False)
            scored = rollout_and_score(
                self.policy, self.parts.sampler, self.scorer(batch), batch, self.sigmas, noise_level, self.world, engine,
                generator=generator_for(self.config.seed, CALIBRATION_STREAM, round_index),
            )
            self.totals["nfe_calibration"] += scored.nfe_rollout + scored.nfe_dense
            calibrator.update(calibration_stats(scored.dense, self.sigmas, noise_level))
            entry = {
                "round": round_index,
                "noise_level_used": [round(float(v), 6) for v in noise_level],
                "noise_level_next": [round(float(v), 6) for v in calibrator.noise_level(self.sigmas)],
                "reward_mean": float(np.nanmean(scored.terminal.numpy())),
                **dense_gain_stats(scored.dense),
            }
            history.append(entry)
            if log is not None:
                log(entry)
            if bool(getattr(calibrator, "converged", False)):
                break
        return history

    # ---- one iteration ----------------------------------------------------------------
    def step(self, iteration: int) -> dict[str, Any]:
        t = self.config.train
        started = time.perf_counter()
        batch = self.make_batch(iteration, TRAIN_STREAM, t.groups_per_iteration, t.group_size, t.same_noise_per_group)
        noise_level = self.parts.calibrator.noise_level(self.sigmas)
        # 1-2. rollout with psi, then rewards (dense engine if the estimator asks for it)
        online = self.config.calibration.online_every and (iteration + 1) % self.config.calibration.online_every == 0
        engine = self.engine if (self.estimator_is_dense or online) else None
        # online calibration needs the gains of every step
        trained_fraction = t.timestep_fraction if (self.estimator_is_step_local and not online) else None
        scored = rollout_and_score(
            self.policy, self.parts.sampler, self.scorer(batch, self.per_reward), batch, self.sigmas, noise_level, self.world, engine,
            generator=generator_for(self.config.seed, TRAIN_STREAM, iteration), trained_fraction=trained_fraction,
        )
        if not self.estimator_is_dense and scored.dense is not None:
            self.totals["nfe_calibration"] += scored.nfe_dense  # dense rewards only bought for online calibration
            scored.nfe_dense, dense_for_advantages = 0, None
        else:
            dense_for_advantages = scored.dense
        # 3. advantages (N, T) on the whole batch, then this rank's rows
        advantages = compute_advantages(
            self.parts.advantage,
            _with_dense(scored, dense_for_advantages),
            t.group_size,
            t.advantage_clip,
            weights=[r.weight for r in self.parts.rewards] if self.per_reward else None,
        )
        local_advantages = advantages[self.world.shard(batch.global_size)]
        # 4. clipped surrogate + KL, optimizer step(s)
        update = update_policy(self.policy, self.parts.sampler, self.optimizer, scored.traj, local_advantages, t, self.parallel)
        if self.ema is not None:
            self._update_ema()
        if online and scored.dense is not None:
            self.parts.calibrator.update(calibration_stats(scored.dense, self.sigmas, noise_level))
        seconds = time.perf_counter() - started
        terminal = scored.terminal
        estimator_stats = dict(getattr(self.parts.advantage, "last_stats", {}) or {})
        record: dict[str, Any] = {
            "iteration": iteration,
            "reward_mean": _nanmean(terminal),
            "reward_std": _nanstd(terminal),
            **dense_gain_stats(scored.dense),
            "noise_level": [round(float(v), 6) for v in noise_level],
            "approx_kl": update["approx_kl"],
            "kl": update["kl"],
            "clipfrac": update["clipfrac"],
            "policy_loss": update["policy_loss"],
            "grad_norm": update["grad_norm"],
            "first_step_ratio_dev": update["first_step_ratio_dev"],
            "ratio_dev_max": update["ratio_dev_max"],
            "zero_std_ratio": float(estimator_stats.get("zero_std_ratio", _zero_std_ratio(terminal, t.group_size))),
            "nan_rewards": int(torch.isnan(terminal).sum()),
            "advantage_abs_mean": float(advantages.abs().mean()),
            "nfe_rollout": scored.nfe_rollout,
            "nfe_dense": scored.nfe_dense,
            "nfe_train": int(update["nfe_train"]),
            "reward_calls": scored.reward_calls,
            "iteration_s": round(seconds, 4),
            **{k: round(v, 4) for k, v in scored.seconds.items()},
        }
        return record

    def _update_ema(self) -> None:
        decay = self.config.train.ema_decay
        with torch.no_grad():
            for name, value in self.policy.trainable_state_dict().items():
                self.ema[name].mul_(decay).add_(value.detach(), alpha=1 - decay)

    # ---- checkpoints ------------------------------------------------------------------
    @property
    def shares_rank0_work(self) -> bool:
        """Whether this rank takes part in rank 0's work (checkpoints, evaluation, sample grids):
        rank 0 itself, or every rank when weights are sharded (FSDP), where gathering the weights
        and every forward pass are collective."""
        return self.world.is_main or self.parallel.sharded

    def save_checkpoint(self) -> None:
        """Rank 0 writes the checkpoint; with sharded weights (FSDP) every rank first helps gather them."""
        if not self.shares_rank0_work:
            return
        trainable = self.policy.trainable_state_dict()
        optimizer = self.parallel.optimizer_state_dict(self.optimizer)
        if not self.world.is_main:
            return
        state = {
            "iteration": self.iteration,
            "totals": self.totals,
            "calibrator": _state_dict(self.parts.calibrator),
            "seed": self.config.seed,
            "world_size": self.world.world_size,
        }
        ckpt.save(
            self.run_dir,
            self.iteration,
            ckpt.Checkpoint(trainable, optimizer, state, self.ema),
        )

    def restore(self, folder: Path) -> None:
        saved = ckpt.load(folder, map_location=self.policy.device)
        self.policy.load_trainable_state_dict(saved.trainable)
        self.parallel.load_optimizer_state_dict(self.optimizer, saved.optimizer)
        if saved.ema is not None and self.ema is not None:
            self.ema = {k: v.clone() for k, v in saved.ema.items()}
        self.iteration = int(saved.state["iteration"])
        self.totals.update(saved.state.get("totals", {}))
        if saved.state.get("calibrator") is not None and hasattr(self.parts.calibrator, "load_state_dict"):
            self.parts.calibrator.load_state_dict(saved.state["calibrator"])

    # ---- evaluation and pictures --------------------------------------------------------

    def evaluate(self) -> float | None:
        """Mean evaluation reward (``eval_reward``); ``None`` when ``logging.eval_prompts`` is 0."""
        scores = self.eval_scores()
        return None if scores is None else _nanmean(scores)

    def eval_scores(self, split: str = "test") -> torch.Tensor | None:
        """Per-image evaluation rewards ``(prompts * images_per_prompt,)``: ODE samples of the first
        ``eval_prompts`` prompts from the fixed noise of ``seed``, so two calls pair image by image.

        ``split`` ``"test"``: the held-out prompts, ``eval_images_per_prompt`` each (``eval_reward``);
        ``"train"``: the training prompts, ``train_eval_images_per_prompt`` each (``train_eval_reward``).
        ``None`` when that evaluation is off.
        """
        logging = self.config.logging
        source, per_prompt = {
            "test": (self.test_records, logging.eval_images_per_prompt),
            "train": (self.train_records, logging.train_eval_images_per_prompt),
        }[split]
        count = logging.eval_prompts
        if count == 0 or per_prompt == 0:
            return None
        records = [r for r in source[:count] for _ in range(per_prompt)]
        images = self._eval_images([r["prompt"] for r in records])
        rewards = RewardScorer(self.parts.rewards, [r["prompt"] for r in records], [r if "include" in r else None for r in records])
        return rewards(images, torch.arange(len(records))).float()

    def _eval_images(self, prompts: list[str]) -> torch.Tensor:
        context = self._ema_weights() if self.ema is not None else nullcontext()
        with context:
            return generate(self.policy, prompts, self.config.sampling.eval_steps, self.config.sampling.shift, self.config.seed)

    @contextmanager
    def _ema_weights(self):
        """Evaluate with the EMA weights, then put the trained weights back."""
        saved = {k: v.detach().clone() for k, v in self.policy.trainable_state_dict().items()}
        self.policy.load_trainable_state_dict(self.ema)
        try:
            yield
        finally:
            self.policy.load_trainable_state_dict(saved)

    def write_samples(self, iteration: int) -> None:
        count = self.config.logging.sample_prompts
        if count == 0 or not self.shares_rank0_work:
            return
        prompts = [r["prompt"] for r in self.test_records[:count]]
        images = self._eval_images(prompts)
        if self.world.is_main:
            save_png(make_grid(images, prompts), self.run_dir / "samples" / f"iter-{iteration:06d}.png")


def _with_dense(scored, dense):
    from dataclasses import replace

    if dense is None:
        return replace(scored, dense=None, dense_per_reward=None)
    return replace(scored, dense=dense)


def _state_dict(component: Any) -> Any:
    return component.state_dict() if hasattr(component, "state_dict") else None


def open_tensorboard(run_dir: Path, purge_step: int | None = None) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``run_dir/tensorboard``; ``purge_step`` (the iteration a
    resumed run starts at) drops the events a killed run wrote after its last checkpoint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UserError(
            "logging.tensorboard=true needs the tensorboard package: pip install 'densegrpo[tensorboard]' "
            "(or set logging.tensorboard=false)"
        ) from error
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step or None)


def write_scalars(board: Any, record: dict[str, Any]) -> None:
    """One iteration's metrics as TensorBoard scalars at step ``iteration``: numbers as they
    are, per-step lists (``noise_level``, ``dense_gain_mean``, ...) as ``name/k<step>``."""
    step = int(record["iteration"])
    for key, value in record.items():
        if key == "iteration":
            continue
        values = value if isinstance(value, list) else [value]
        for k, item in enumerate(values):
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                continue
            board.add_scalar(f"{key}/k{k}" if isinstance(value, list) else key, item, step)
    board.flush()


def save_eval_base(run_dir: Path, scores: torch.Tensor, prefix: str = "eval") -> None:
    """Write the base policy's per-image rewards of evaluation ``prefix`` (NaN as null), atomically."""
    values = [None if math.isnan(v) else v for v in scores.double().tolist()]
    path = Path(run_dir) / EVAL_BASE[prefix]
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"scores": values}), encoding="utf-8")
    os.replace(tmp, path)


def load_eval_base(run_dir: Path, prefix: str = "eval") -> torch.Tensor | None:
    """The scores :func:`save_eval_base` wrote, or ``None`` for a run without them."""
    path = Path(run_dir) / EVAL_BASE[prefix]
    if not path.exists():
        return None
    values = json.loads(path.read_text(encoding="utf-8"))["scores"]
    return torch.tensor([math.nan if v is None else v for v in values], dtype=torch.float32)


def _nanmean(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.mean()) if valid.numel() else math.nan


def _nanstd(values: torch.Tensor) -> float:
    valid = values[~torch.isnan(values)]
    return float(valid.std(unbiased=False)) if valid.numel() > 1 else 0.0


def _zero_std_ratio(terminal: torch.Tensor, group_size: int) -> float:
    groups = terminal.reshape(-1, group_size)
    return float((torch.nan_to_num(groups).std(dim=1, unbiased=False) < 1e-8).float().mean())


def _truncate_metrics(path: Path, before_iteration: int) -> None:
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


def run_training(config: cfg.RunConfig, run_dir: Path, resume: bool = False, components: Components | None = None) -> dict[str, Any]:
    """Train ``config`` into ``run_dir``; with ``resume``, continue from its latest checkpoint."""
    world = init_world()
    try:
        summary = _run(config, Path(run_dir), resume, world, components)
        world.barrier()  # every rank is done before the process group goes away
        return summary
    finally:
        shutdown(world)


def _run(config: cfg.RunConfig, run_dir: Path, resume: bool, world: World, components: Components | None) -> dict[str, Any]:
    metrics_path = run_dir / METRICS
    if world.is_main:
        if not resume and metrics_path.exists():
            raise UserError(f"'{run_dir}' already holds a run; pass --resume {run_dir} to continue it or choose another --out")
        save_run_config(run_dir, config)
    trainer = Trainer(config, run_dir, world, components)
    if resume:
        folder = ckpt.latest(run_dir)
        if folder is not None:
            trainer.restore(folder)
        if world.is_main:
            _truncate_metrics(metrics_path, trainer.iteration)
    board = open_tensorboard(run_dir, purge_step=trainer.iteration) if config.logging.tensorboard and world.is_main else None
    start_elapsed = trainer.totals["elapsed_s"]
    started = time.perf_counter()

    def log_calibration(entry: dict[str, Any]) -> None:
        if world.is_main:
            with open(run_dir / "calibration.jsonl", "a", encoding="utf-8") as stream:
                stream.write(json.dumps(entry) + "\n")

    if trainer.iteration == 0 and config.calibration.before_training and calibration_rounds(trainer.parts.calibrator) > 0:
        if world.is_main and (run_dir / "calibration.jsonl").exists():
            (run_dir / "calibration.jsonl").unlink()
        calibration_started = time.perf_counter()
        history = trainer.calibrate(log=log_calibration)
        trainer.totals["wall_s"] += time.perf_counter() - calibration_started
        if world.is_main and history:
            plots.plot_calibration(history, run_dir / "calibration.png", uniform=_uniform_level(trainer.parts.calibrator))
    if trainer.iteration == 0:
        trainer.write_samples(0)
    # per evaluation (held-out test prompts, and optionally the training prompts): the base's per-image scores
    base_scores: dict[str, torch.Tensor | None] = {prefix: None for prefix in EVALUATIONS}
    if trainer.shares_rank0_work:
        fresh = trainer.iteration == 0
        for prefix, split in EVALUATIONS.items():
            base_scores[prefix] = trainer.eval_scores(split) if fresh else load_eval_base(run_dir, prefix)
            if base_scores[prefix] is not None and fresh and world.is_main:
                save_eval_base(run_dir, base_scores[prefix], prefix)
    progress = tqdm(
        total=config.iterations,
        initial=trainer.iteration,
        desc="GRPO",
        unit="it",
        disable=not (config.logging.progress and world.is_main),
        dynamic_ncols=True,
    )
    every = config.checkpoint_every
    while trainer.iteration < config.iterations:
        iteration = trainer.iteration
        record = trainer.step(iteration)
        trainer.iteration = iteration + 1
        trainer.totals["nfe_rollout"] += record["nfe_rollout"]
        trainer.totals["nfe_dense"] += record["nfe_dense"]
        trainer.totals["nfe_train"] += record["nfe_train"]
        record["nfe"] = record["nfe_rollout"] + record["nfe_dense"] + record["nfe_train"]
        record["nfe_total"] = sum(trainer.totals[k] for k in ("nfe_rollout", "nfe_dense", "nfe_train", "nfe_calibration"))
        if iteration == 0:
            for prefix, base in base_scores.items():
                if base is not None:
                    record[f"{prefix}_reward_base"] = _nanmean(base)
        last = trainer.iteration == config.iterations
        sample_every = config.logging.sample_every
        if trainer.shares_rank0_work and (last or (sample_every and trainer.iteration % sample_every == 0)):
            for prefix, split in EVALUATIONS.items():
                scores = trainer.eval_scores(split)
                if scores is None:
                    continue
                record[f"{prefix}_reward"] = _nanmean(scores)
                base = base_scores[prefix]
                if base is not None and base.shape == scores.shape:
                    paired = paired_gain(base, scores)
                    record[f"{prefix}_gain"] = paired.gain
                    record[f"{prefix}_gain_se"] = paired.se
            trainer.write_samples(trainer.iteration)
        # wall_s: training compute (calibration, rollouts, rewards, updates), without evaluation
        # and picture writing, so budgets compare methods fairly; elapsed_s: everything.
        trainer.totals["wall_s"] += record["iteration_s"]
        trainer.totals["elapsed_s"] = start_elapsed + (time.perf_counter() - started)
        record["wall_s"] = round(trainer.totals["wall_s"], 3)
        record["elapsed_s"] = round(trainer.totals["elapsed_s"], 3)
        if world.is_main:
            with open(metrics_path, "a", encoding="utf-8") as stream:
                stream.write(json.dumps(record) + "\n")
        if board is not None:
            write_scalars(board, record)
        if last or (every and trainer.iteration % every == 0):
            trainer.save_checkpoint()
            world.barrier()
        progress.update(1)
        progress.set_postfix(reward=f"{record['reward_mean']:.3f}", nfe=record["nfe"])
    progress.close()
    if board is not None:
        board.close()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "iterations": trainer.iteration, **trainer.totals}
    if world.is_main:
        rows = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if rows:
            plots.plot_reward_curve(rows, run_dir / "reward_curve.png")
            summary.update({"reward_first": rows[0]["reward_mean"], "reward_last": rows[-1]["reward_mean"]})
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
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return summary


def _uniform_level(calibrator: Any) -> float | None:
    initial = getattr(getattr(calibrator, "config", None), "initial", None)
    return float(initial) if isinstance(initial, (int, float)) else None


def train_from_cli(config_path: Path | None, overrides: list[str], out: Path | None, resume: Path | None) -> dict[str, Any]:
    if resume is not None:
        if out is not None and Path(out) != Path(resume):
            raise UserError("pass either --resume RUN_DIR or --out DIR, not both")
        config = load_run_config(resume, overrides) if config_path is None else cfg.resolve(config_path, overrides)
        return run_training(config, Path(resume), resume=True)
    config = cfg.resolve(config_path, overrides)
    return run_training(config, Path(out) if out else default_run_dir())


def calibrate_from_cli(config_path: Path | None, overrides: list[str], out: Path | None) -> Path:
    config = cfg.resolve(config_path, overrides)
    run_dir = Path(out) if out else default_run_dir("calibrate-")
    run_dir.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(config, run_dir)
    rounds = calibration_rounds(trainer.parts.calibrator)
    if rounds == 0:
        raise UserError(f"calibrator '{config.calibrator.name}' has no calibration rounds; use --set calibrator.name=reward-aware")
    progress = tqdm(total=rounds, desc="calibration", unit="round", disable=not config.logging.progress)

    def log(entry: dict[str, Any]) -> None:
        progress.update(1)
        progress.set_postfix(psi_mean=f"{np.mean(entry['noise_level_next']):.3f}")

    history = trainer.calibrate(log=log)
    progress.close()
    result = {
        "sigmas": [float(s) for s in trainer.sigmas],
        "rounds": history,
        "psi": history[-1]["noise_level_next"] if history else None,
        "converged": bool(getattr(trainer.parts.calibrator, "converged", False)),
        "nfe": trainer.totals["nfe_calibration"],
    }
    path = run_dir / "calibration.json"
    path.write_text(json.dumps(result, indent=2), encoding="utf-8")
    plots.plot_calibration(history, run_dir / "calibration.png", uniform=_uniform_level(trainer.parts.calibrator))
    return path
