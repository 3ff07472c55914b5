"""Held-out (and optionally training-prompt) evaluation: ODE samples from fixed noise,
scored and paired image by image with the untrained policy's."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from densegrpo.method.grpo import nanmean
from densegrpo.run.batches import prompt_metadata
from densegrpo.run.evaluate import generate, load_scores, paired_gain, save_scores
from densegrpo.run.monitors import HACKING_KEY, Monitors, hacking, warn_hacking

if TYPE_CHECKING:
    from densegrpo.run.state import Run

EVALUATIONS = {"eval": "test", "train_eval": "train"}
"""Metric prefix -> prompt split of each evaluation a run logs."""
EVAL_BASE = {"eval": "eval_base.json", "train_eval": "train_eval_base.json"}
"""Per-image rewards of the untrained policy, by evaluation, kept so a resumed run still logs its gains."""


def eval_scores(run: "Run", split: str = "test") -> torch.Tensor | None:
    """Per-image evaluation rewards ``(prompts * images_per_prompt,)``: ODE samples of the first
    ``eval_prompts`` prompts from the fixed noise of ``seed``, so two calls pair image by image.

    ``split`` ``"test"``: the held-out prompts, ``eval_images_per_prompt`` each (``eval_reward``);
    ``"train"``: the training prompts, ``train_eval_images_per_prompt`` each (``train_eval_reward``).
    ``None`` when that evaluation is off. Sharded over ranks (:func:`evaluate_split`): every rank
    must call it, and every rank gets all the scores.
    """
    evaluated = evaluate_split(run, split)
    return None if evaluated is None else evaluated[0]


def eval_rewards(run: "Run", records: list[dict[str, Any]], images: torch.Tensor) -> torch.Tensor:
    """``(M,)`` float32 run rewards of evaluation ``images (M,3,H,W)``, one prompt record each."""
    return run.records_scorer(records).weighted(images, torch.arange(len(records))).float()


def eval_records(run: "Run", split: str = "test") -> list[dict[str, Any]] | None:
    """The prompt records of evaluation ``split``, one per image (each prompt repeated
    ``images_per_prompt`` times, in order), or ``None`` when that evaluation is off."""
    logging = run.config.logging
    source, per_prompt = {
        "test": (run.test_records, logging.eval_images_per_prompt),
        "train": (run.train_records, logging.train_eval_images_per_prompt),
    }[split]
    count = logging.eval_prompts
    if count == 0 or per_prompt == 0:
        return None
    return [r for r in source[:count] for _ in range(per_prompt)]


def evaluate_split(run: "Run", split: str = "test", monitors: Monitors | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
    """Per-image run rewards ``(M,)`` of evaluation ``split`` and each monitor's ``(M,)`` scores of the
    same images (``monitors``, by label; empty without), equal on every rank; ``None`` when the
    evaluation is off. Every rank must call it at the same point.

    **Sharded.** Rank ``r`` generates and scores only its share ``run.world.split(M)`` of the ``M``
    images, each from the noise of its global index, then the scores are gathered in order
    (:meth:`~densegrpo.method.distributed.World.gather_split`): each image is generated and scored
    once, and the result is the one-process result. With sharded weights (FSDP) every forward is a
    collective, so every rank must run the same forwards: a share one row short of
    ``ceil(M / W)`` is padded with a copy of its last row (an empty share: of row 0), whose image is
    generated and dropped unscored.

    **Chunked.** The share runs ``sampling.chunk_size`` images at a time (``None``: all at once, the
    model calls in :data:`~densegrpo.run.evaluate.EVAL_CHUNK`-row batches): each chunk is sampled,
    decoded, scored by the rewards and monitors, and dropped, so one chunk of images is alive at once.
    """
    records = eval_records(run, split)
    if records is None:
        return None
    world, total = run.world, len(records)
    share = world.split(total)
    rows = list(range(share.start, share.stop))
    padded = rows
    if run.learner.parallel.sharded:
        width = -(-total // world.world_size)
        padded = rows + [rows[-1] if rows else 0] * (width - len(rows))
    chunk = run.config.sampling.chunk_size or max(len(padded), 1)
    labels = list(monitors.rewards) if monitors else []
    scores: list[torch.Tensor] = []
    monitored: dict[str, list[torch.Tensor]] = {label: [] for label in labels}
    for start in range(0, len(padded), chunk):
        block = padded[start : start + chunk]
        images = eval_images(run, [records[i]["prompt"] for i in block], block[0])
        kept = [records[i] for i in block[: max(0, len(rows) - start)]]  # the padding rows are not scored
        if not kept:
            continue
        images = images[: len(kept)]
        scores.append(eval_rewards(run, kept, images))
        if monitors:
            chunk_scores = monitors.score(images, [r["prompt"] for r in kept], [prompt_metadata(r) for r in kept])
            for label in labels:
                monitored[label].append(chunk_scores[label])
    local = torch.cat(scores) if scores else torch.empty(0)
    gathered = world.gather_split(local, total)
    return gathered, {label: world.gather_split(torch.cat(v) if v else torch.empty(0), total) for label, v in monitored.items()}


def eval_images(run: "Run", prompts: list[str], start_index: int = 0) -> torch.Tensor:
    """ODE samples ``(N,3,H,W)`` of ``prompts`` with the evaluation weights and fixed noise; image
    ``i`` from the noise of index ``start_index + i``; ``sampling.chunk_size`` rows per model call."""
    sampling = run.config.sampling
    with run.evaluation_weights():
        return generate(run.policy, prompts, sampling.eval_steps, sampling.shift, run.config.seed, start_index, sampling.chunk_size)


def save_eval_base(run_dir: Path, scores: torch.Tensor, prefix: str = "eval") -> None:
    """Write the base policy's per-image rewards of evaluation ``prefix`` (NaN as null), atomically."""
    save_scores(Path(run_dir) / EVAL_BASE[prefix], scores)


def load_eval_base(run_dir: Path, prefix: str = "eval") -> torch.Tensor | None:
    """The scores :func:`save_eval_base` wrote, or ``None`` for a run without them."""
    return load_scores(Path(run_dir) / EVAL_BASE[prefix])


class EvaluationHook:
    """Scores the base policy before training (or reads its scores back on resume), then every
    ``logging.sample_every`` iterations and at the end logs ``<prefix>_reward`` and the paired
    ``<prefix>_gain`` +- ``<prefix>_gain_se`` for each evaluation of :data:`EVALUATIONS`.

    The monitor rewards (``logging.monitor_rewards``, :mod:`densegrpo.run.monitors`) score the same
    held-out images as ``eval_reward``; an evaluation where the trained reward rose and a monitor
    fell adds ``reward_hacking`` (the monitors' labels) to its record and warns once."""

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor | None] = {prefix: None for prefix in EVALUATIONS}
        self.monitors: Monitors | None = None

    def before_training(self, run: "Run") -> None:
        # Every rank evaluates its share (evaluate_split); rank 0 alone writes the files.
        self.monitors = Monitors.build(run.config.logging.monitor_rewards)
        fresh = run.iteration == 0
        for prefix, split in EVALUATIONS.items():
            if not fresh:
                self.base[prefix] = load_eval_base(run.run_dir, prefix)
                continue
            evaluated = self.evaluate(run, split)
            if evaluated is None:
                continue
            self.base[prefix], monitored = evaluated
            if monitored:
                self.monitors.base = monitored
            if run.world.is_main:
                save_eval_base(run.run_dir, self.base[prefix], prefix)
                if monitored:
                    self.monitors.save_base(run.run_dir)
        if not fresh:
            self.monitors.load_base(run.run_dir)

    def evaluate(self, run: "Run", split: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]] | None:
        """Per-image rewards of evaluation ``split`` and, on the held-out prompts, of each monitor
        (:func:`evaluate_split`: sharded over ranks, so every rank calls it)."""
        return evaluate_split(run, split, self.monitors if split == "test" else None)

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        if record["iteration"] == 0:
            for prefix, base in self.base.items():
                if base is not None:
                    record[f"{prefix}_reward_base"] = nanmean(base)
            if self.monitors:
                record.update(self.monitors.base_record())
        if not run.due(run.config.logging.sample_every):
            return
        for prefix, split in EVALUATIONS.items():
            evaluated = self.evaluate(run, split)
            if evaluated is None:
                continue
            scores, monitored = evaluated
            record[f"{prefix}_reward"] = nanmean(scores)
            base = self.base[prefix]
            if base is not None and base.shape == scores.shape:
                paired = paired_gain(base, scores)
                record[f"{prefix}_gain"] = paired.gain
                record[f"{prefix}_gain_se"] = paired.se
            if monitored:
                record.update(self.monitors.record(monitored))
        if self.monitors:
            fell = hacking(record, list(self.monitors.rewards), run.config.logging.monitor_warn_se)
            if fell:
                record[HACKING_KEY] = fell
                if run.world.is_main:
                    warn_hacking(record, fell)

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        pass
