"""Two GRPO iterations of a tiny policy through the full trainer (``densegrpo.run.train.run_training``), the
check every diffusers policy's test file makes, sparse and dense (issue 22)."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def run_two_iterations(policy: str, advantage: str, run_dir: Path, overrides: tuple[str, ...] = ()) -> list[dict]:
    """Train ``policy`` (a registered name or ``module:attr``) for 2 iterations of 2 groups of 2 images,
    3 steps, scored by ``toy-clip``; check that the run ended cleanly and return its ``metrics.jsonl`` rows.

    Checks: both iterations logged finite rewards, losses and gradient norms; sparse scores one terminal
    image per sample and dense also the intermediate states; a sample grid and a checkpoint holding
    only LoRA weights were written.
    """
    from densegrpo.contracts import config as cfg
    from densegrpo.run.train import run_training
    from safetensors.torch import load_file

    config = cfg.resolve(None, [
        f"policy.name={policy}",
        "rewards.0.name=toy-clip",
        f"advantage.name={advantage}",
        "sampling.num_steps=3",
        "sampling.eval_steps=2",
        "train.group_size=2",
        "train.groups_per_iteration=2",
        "iterations=2",
        "checkpoint_every=0",
        "logging.progress=false",
        "logging.sample_prompts=2",
        "logging.eval_prompts=2",
        "calibrator.name=uniform",
        *overrides,
    ])
    run_training(config, run_dir)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor([r["reward_mean"], r["policy_loss"], r["grad_norm"]])).all() for r in rows)
    if advantage == "sparse":
        assert rows[0]["reward_calls"] == 4 and rows[0]["nfe_dense"] == 0  # one score per image, terminal only
    else:
        assert rows[0]["reward_calls"] > 4 and rows[0]["nfe_dense"] > 0  # intermediate states completed and scored
    assert (run_dir / "samples" / "iter-000002.png").exists()
    saved = load_file(run_dir / "checkpoints" / "iter-000002" / "trainable.safetensors")
    assert saved and all("lora_" in name for name in saved)  # only LoRA weights are trained and saved
    return rows
