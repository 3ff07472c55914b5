"""2-iteration smoke runs of every estimator x calibrator on the toy world, and LoRA updates."""

from __future__ import annotations

import json

import pytest
import torch
from densegrpo.contracts import config as cfg
from densegrpo.contracts import registry
from densegrpo.run.state import Run
from densegrpo.run.train import run_training, train_step

SMALL = [
    "iterations=2",
    "checkpoint_every=0",
    "sampling.num_steps=4",
    "sampling.eval_steps=4",
    "train.group_size=2",
    "train.groups_per_iteration=2",
    "logging.progress=false",
    "logging.sample_prompts=2",
    "logging.eval_prompts=2",
]


def _calibrator_options(name: str) -> list[str]:
    return ["calibrator.config.max_rounds=1", "calibrator.config.samples_per_round=4"] if name == "reward-aware" else []


@pytest.mark.parametrize("calibrator", registry.available("calibrators"))
@pytest.mark.parametrize("advantage", registry.available("advantages"))
def test_two_iterations_of_every_combination(tmp_path, advantage, calibrator):
    config = cfg.resolve(None, [*SMALL, f"advantage.name={advantage}", f"calibrator.name={calibrator}", *_calibrator_options(calibrator)])
    summary = run_training(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(r["reward_mean"] == r["reward_mean"] for r in rows)
    assert rows[0]["kl"] == 0.0
    if rows[0]["zero_advantage_dropped"] < 1.0:
        assert rows[0]["first_step_ratio_dev"] == 0.0
    else:  # every 2-sample group tied (sparse toy-geneval): train.drop_zero_advantage leaves nothing to train
        assert rows[0]["nfe_train"] == 0
    dense = registry.load("advantages", advantage).needs.dense
    assert (rows[0]["nfe_dense"] > 0) == dense
    assert summary["iterations"] == 2 and (tmp_path / "run" / "reward_curve.png").exists()


def test_lora_step_changes_adapter_and_not_base_weights(tmp_path):
    # toy-clip is continuous, so the 2-sample groups get nonzero advantages: toy-geneval ties them here, and
    # train.drop_zero_advantage then leaves nothing to train
    options = [*SMALL, "advantage.name=sparse", "calibrator.name=uniform", "train.learning_rate=0.01", "rewards.0.name=toy-clip"]
    trainer = Run(cfg.resolve(None, options), tmp_path)
    module = trainer.policy.transformer
    lora = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" in n}
    base = {n: p.detach().clone() for n, p in module.named_parameters() if "lora_" not in n}
    assert lora and base
    train_step(trainer)
    after = dict(module.named_parameters())
    assert any(not torch.equal(after[n].detach(), v) for n, v in lora.items()), "no LoRA weight moved"
    assert all(torch.equal(after[n].detach(), v) for n, v in base.items()), "a base weight moved"
    assert all(not p.requires_grad for p in trainer.policy.text_encoder.parameters())
