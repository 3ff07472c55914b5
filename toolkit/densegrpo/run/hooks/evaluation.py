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
    ``None`` when that evaluation is off.
    """
    evaluated = eval_samples(run, split)
    if evaluated is None:
        return None
    return eval_rewards(run, *evaluated)


def eval_rewards(run: "Run", records: list[dict[str, Any]], images: torch.Tensor) -> torch.Tensor:
    """``(M,)`` float32 run rewards of evaluation ``images (M,3,H,W)``, one prompt record each."""
    return run.records_scorer(records).weighted(images, torch.arange(len(records))).float()


def eval_samples(run: "Run", split: str = "test") -> tuple[list[dict[str, Any]], torch.Tensor] | None:
    """The prompt records (one per image) and ODE images ``(M,3,H,W)`` :func:`eval_scores` scores,
    or ``None`` when that evaluation is off."""
    logging = run.config.logging
    source, per_prompt = {
        "test": (run.test_records, logging.eval_images_per_prompt),
        "train": (run.train_records, logging.train_eval_images_per_prompt),
    }[split]
    count = logging.eval_prompts
    if count == 0 or per_prompt == 0:
        return None
    records = [r for r in source[:count] for _ in range(per_prompt)]
    return records, eval_images(run, [r["prompt"] for r in records])


def eval_images(run: "Run", prompts: list[str]) -> torch.Tensor:
    """ODE samples ``(N,3,H,W)`` of ``prompts`` with the evaluation weights and fixed noise."""
    sampling = run.config.sampling
    with run.evaluation_weights():
        return generate(run.policy, prompts, sampling.eval_steps, sampling.shift, run.config.seed)


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
        if not run.shares_rank0_work:
            return
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
        """Per-image rewards of evaluation ``split`` and, on the held-out prompts, of each monitor."""
        evaluated = eval_samples(run, split)
        if evaluated is None:
            return None
        records, images = evaluated
        scores = eval_rewards(run, records, images)
        monitored = {}
        if split == "test" and self.monitors:
            monitored = self.monitors.score(images, [r["prompt"] for r in records], [prompt_metadata(r) for r in records])
        return scores, monitored

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        if record["iteration"] == 0:
            for prefix, base in self.base.items():
                if base is not None:
                    record[f"{prefix}_reward_base"] = nanmean(base)
            if self.monitors:
                record.update(self.monitors.base_record())
        if not (run.shares_rank0_work and run.due(run.config.logging.sample_every)):
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
