"""Monitor rewards: scored on the evaluation's images, paired with the base, and the
reward-hacking warning, on constructed records and on a real toy run that hacks a colour reward."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from densegrpo.contracts import config as cfg
from densegrpo.contracts.config import RewardSpec
from densegrpo.run.monitors import (
    MONITOR_BASE,
    Monitors,
    RewardHackingWarning,
    hacking,
    monitor_labels,
)
from densegrpo.run.train import run_training

# Trains on a reward that pays for red only (tests/monitor_rewards.py), at a high learning
# rate so two iterations move it; watches blue (which must fall) and red itself (which rises).
HACKED = [
    "iterations=2", "checkpoint_every=0", "sampling.num_steps=4", "sampling.eval_steps=4",
    "train.group_size=4", "train.groups_per_iteration=4", "train.learning_rate=0.01",
    "advantage.name=sparse", "calibrator.name=uniform", "rewards.0.name=monitor_rewards:RedShare",
    "logging.progress=false", "logging.sample_prompts=0", "logging.eval_prompts=8",
    "logging.eval_images_per_prompt=2", "logging.train_eval_images_per_prompt=0", "logging.sample_every=2",
    "logging.step_diagnostics=false",
    "logging.monitor_rewards=[{name: 'monitor_rewards:BlueShare'}, {name: 'monitor_rewards:RedShare'}]",
]


def record(gain, se, **monitors):
    out = {"iteration": 4, "eval_gain": gain, "eval_gain_se": se}
    for label, (m_gain, m_se) in monitors.items():
        out.update({f"monitor_{label}_gain": m_gain, f"monitor_{label}_gain_se": m_se})
    return out


@pytest.mark.parametrize(
    "rec, expected",
    [
        (record(0.10, 0.02, a=(-0.05, 0.01), b=(0.03, 0.01)), ["a"]),  # trained up, a down: warn for a only
        (record(0.10, 0.02, a=(-0.005, 0.01)), []),  # the monitor's fall is within its standard error
        (record(0.01, 0.02, a=(-0.05, 0.01)), []),  # the trained reward did not rise beyond its standard error
        (record(-0.10, 0.02, a=(-0.05, 0.01)), []),  # both fell: a bad run, not a hacked reward
        (record(0.10, math.nan, a=(-0.05, 0.01)), []),  # no standard error (one image): no claim
        ({"iteration": 3, "eval_gain": 0.1, "eval_gain_se": 0.01}, []),  # no monitor scored this time
    ],
)
def test_warning_rule_on_constructed_records(rec, expected):
    assert hacking(rec, ["a", "b"]) == expected


def test_warning_threshold_scales_with_k():
    rec = record(0.10, 0.02, a=(-0.015, 0.01))
    assert hacking(rec, ["a"], k=1.0) == ["a"] and hacking(rec, ["a"], k=2.0) == []


def test_labels_are_metric_safe_and_unique():
    specs = [RewardSpec(name="toy-geneval"), RewardSpec(name="toy-geneval", config={"mode": "strict"}), RewardSpec(name="pkg.mod:MyReward")]
    assert monitor_labels(specs) == ["toy_geneval", "toy_geneval_2", "myreward"]


def test_base_scores_survive_a_resume(tmp_path):
    monitors = Monitors.build([RewardSpec(name="monitor_rewards:BlueShare")])
    monitors.base = {"blueshare": torch.tensor([0.5, math.nan, -0.25])}
    monitors.save_base(tmp_path)
    again = Monitors.build([RewardSpec(name="monitor_rewards:BlueShare")])
    again.load_base(tmp_path)
    assert torch.equal(again.base["blueshare"].isnan(), torch.tensor([False, True, False]))
    assert again.base["blueshare"][[0, 2]].tolist() == [0.5, -0.25]
    scored = again.record({"blueshare": torch.tensor([0.75, 0.0, -0.25])})
    assert scored["monitor_blueshare_gain"] == pytest.approx(0.125)  # paired over the 2 images both scored


def test_hacked_colour_reward_warns_on_a_real_run(tmp_path):
    run = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_training(cfg.resolve(None, HACKED), run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    first, last = rows[0], rows[-1]
    # the base is logged on iteration 0, the monitors beside eval_reward at the evaluation
    assert {"monitor_blueshare_reward_base", "monitor_redshare_reward_base"} <= set(first)
    assert (run / MONITOR_BASE).exists() and set(json.loads((run / MONITOR_BASE).read_text())["scores"]) == {"blueshare", "redshare"}
    assert {"monitor_blueshare_reward", "monitor_blueshare_gain", "monitor_blueshare_gain_se"} <= set(last)
    # monitoring the trained reward itself reproduces eval_reward and its paired gain exactly
    assert last["monitor_redshare_reward"] == pytest.approx(last["eval_reward"])
    assert last["monitor_redshare_gain"] == pytest.approx(last["eval_gain"])
    # red went up beyond its standard error, blue down beyond its own: the warning names blue only
    assert last["eval_gain"] > last["eval_gain_se"] > 0
    assert last["monitor_blueshare_gain"] < -last["monitor_blueshare_gain_se"] < 0
    assert last["reward_hacking"] == ["blueshare"]
    assert "reward_hacking" not in first
    hacked = [w for w in caught if issubclass(w.category, RewardHackingWarning)]
    assert len(hacked) == 1 and "iteration 1" in str(hacked[0].message) and "blueshare" in str(hacked[0].message)
    assert (run / "reward_curve.png").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["reward_hacking_iterations"] == [1] and summary["monitor_blueshare_gain_final"] == last["monitor_blueshare_gain"]


def test_describe_lists_the_new_options():
    text = cfg.describe(cfg.default_config())
    for option in ("monitor_rewards:", "monitor_warn_se:", "step_diagnostics:", "wandb:", "project:", "mode:"):
        assert option in text
    assert "reward hacking" in text and "Weights & Biases" in text
