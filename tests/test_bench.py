"""Smoke test of the quick benchmark profile: it runs and writes every artefact."""

from __future__ import annotations

import json

from densegrpo.bench import ARMS, arm_config, PROFILES, run_sparse_vs_dense


def test_every_arm_is_a_plain_component_combination():
    for arm in ARMS:
        config = arm_config(arm, "toy-geneval", 0, PROFILES["quick"], 2)
        assert config.advantage.name in {"sparse", "dense", "dense-raw", "dense-return"}
        assert config.calibrator.name in {"uniform", "reward-aware"}
    assert arm_config("dense-n1", "toy-clip", 0, PROFILES["quick"], 2).advantage.config == {"completion": 1}
    assert arm_config("flow-grpo", "toy-clip", 1, PROFILES["quick"], 2).rewards[0].name == "toy-clip"


def test_quick_profile_writes_report_results_and_plots(tmp_path):
    report = run_sparse_vs_dense(seeds=1, iterations=2, rewards=["toy-geneval"], out=tmp_path, quick=True, arms=["flow-grpo", "densegrpo"])
    text = report.read_text()
    assert "| flow-grpo |" in text and "| densegrpo |" in text and "dense engine batched+reuse vs naive" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["runs"]["toy-geneval"]) == {"flow-grpo", "densegrpo"}
    cost = results["costs"]["toy-geneval"]
    assert cost["engine_nfe_batched"] == cost["batch"] * 45 and cost["engine_nfe_naive"] == cost["batch"] * 55
    for name in ("reward_vs_iteration.png", "reward_vs_nfe.png", "reward_vs_wall.png", "psi.png"):
        assert (tmp_path / name).stat().st_size > 1000
