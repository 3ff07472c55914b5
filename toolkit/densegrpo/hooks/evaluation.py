"""Held-out (and optionally training-prompt) evaluation: ODE samples from fixed noise,
scored and paired image by image with the untrained policy's."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from densegrpo.evaluate import generate, paired_gain
from densegrpo.grpo import nanmean

if TYPE_CHECKING:
    from densegrpo.train import Run

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
    logging = run.config.logging
    source, per_prompt = {
        "test": (run.test_records, logging.eval_images_per_prompt),
        "train": (run.train_records, logging.train_eval_images_per_prompt),
    }[split]
    count = logging.eval_prompts
    if count == 0 or per_prompt == 0:
        return None
    records = [r for r in source[:count] for _ in range(per_prompt)]
    images = eval_images(run, [r["prompt"] for r in records])
    return run.records_scorer(records).weighted(images, torch.arange(len(records))).float()


def eval_images(run: "Run", prompts: list[str]) -> torch.Tensor:
    """ODE samples ``(N,3,H,W)`` of ``prompts`` with the evaluation weights and fixed noise."""
    sampling = run.config.sampling
    with run.evaluation_weights():
        return generate(run.policy, prompts, sampling.eval_steps, sampling.shift, run.config.seed)


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


class EvaluationHook:
    """Scores the base policy before training (or reads its scores back on resume), then every
    ``logging.sample_every`` iterations and at the end logs ``<prefix>_reward`` and the paired
    ``<prefix>_gain`` +- ``<prefix>_gain_se`` for each evaluation of :data:`EVALUATIONS`."""

    def __init__(self) -> None:
        self.base: dict[str, torch.Tensor | None] = {prefix: None for prefix in EVALUATIONS}

    def before_training(self, run: "Run") -> None:
        if not run.shares_rank0_work:
            return
        fresh = run.iteration == 0
        for prefix, split in EVALUATIONS.items():
            self.base[prefix] = eval_scores(run, split) if fresh else load_eval_base(run.run_dir, prefix)
            if self.base[prefix] is not None and fresh and run.world.is_main:
                save_eval_base(run.run_dir, self.base[prefix], prefix)

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        if record["iteration"] == 0:
            for prefix, base in self.base.items():
                if base is not None:
                    record[f"{prefix}_reward_base"] = nanmean(base)
        if not (run.shares_rank0_work and run.due(run.config.logging.sample_every)):
            return
        for prefix, split in EVALUATIONS.items():
            scores = eval_scores(run, split)
            if scores is None:
                continue
            record[f"{prefix}_reward"] = nanmean(scores)
            base = self.base[prefix]
            if base is not None and base.shape == scores.shape:
                paired = paired_gain(base, scores)
                record[f"{prefix}_gain"] = paired.gain
                record[f"{prefix}_gain_se"] = paired.se

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        pass
