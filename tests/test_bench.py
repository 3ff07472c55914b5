"""The benchmark: arms are component combinations, the report renders from results alone, and
the quick profile runs and writes every artefact."""

from __future__ import annotations

import json

import numpy as np
import pytest

from densegrpo import plots
from densegrpo.bench import ARMS, PROFILES, Arm, Profile, arm_config, plot_psi, rerender, run_sparse_vs_dense, summarise_run, uniform_level


def test_every_arm_is_a_plain_component_combination():
    for arm in ARMS:
        config = arm_config(arm, "toy-geneval", 0, PROFILES["quick"], 2)
        assert config.advantage.name in {"sparse", "dense", "dense-raw", "dense-return"}
        assert config.calibrator.name in {"uniform", "reward-aware"}
    assert arm_config("dense-n1", "toy-clip", 0, PROFILES["quick"], 2).advantage.config == {"completion": 1}
    assert arm_config("flow-grpo", "toy-clip", 1, PROFILES["quick"], 2).rewards[0].name == "toy-clip"


def test_the_calibrator_field_not_the_description_decides_the_calibration_sizes():
    profile = PROFILES["quick"]
    uniform = arm_config(Arm("reward-aware in words only", "dense", "uniform"), "toy-geneval", 0, profile, 2)
    assert uniform.calibrator.name == "uniform" and uniform.calibrator.config == {}
    calibrated = arm_config(Arm("plain", "sparse", "reward-aware"), "toy-geneval", 0, profile, 2)
    assert calibrated.calibrator.config == {"max_rounds": profile.calibration_rounds, "samples_per_round": profile.calibration_samples}


@pytest.mark.parametrize(("arm", "option", "level"), [("densegrpo", "initial", 0.5), ("flow-grpo", "noise_level", 0.9)])
def test_uniform_level_comes_from_the_arms_calibrator(arm, option, level):
    assert uniform_level(arm_config(arm, "toy-geneval", 0, PROFILES["quick"], 2)) == 0.7
    profile = Profile(**{**vars(PROFILES["quick"]), "overrides": [f"calibrator.config.{option}={level}"]})
    assert uniform_level(arm_config(arm, "toy-geneval", 0, profile, 2)) == level


def test_plot_psi_draws_the_level_it_is_given(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(plots, "uniform_line", lambda ax, level: drawn.append(level))
    seed_dir = tmp_path / "runs" / "toy-geneval" / "densegrpo" / "seed0"
    seed_dir.mkdir(parents=True)
    (seed_dir / "calibration.jsonl").write_text(json.dumps({"round": 0, "noise_level_next": [0.69, 0.71]}) + "\n")
    plot_psi(tmp_path, ["toy-geneval"], 0.55)
    assert drawn == [0.55] and (tmp_path / "psi.png").stat().st_size > 1000


def test_the_training_reward_is_smoothed_by_the_plots_moving_average():
    rows = [{"iteration": i, "reward_mean": r, "wall_s": 1.0 + i, "iteration_s": 1.0, "nfe_total": 10 * (i + 1), "nfe_rollout": 4, "nfe_dense": 0, "nfe_train": 6}
            for i, r in enumerate([0.0, 0.3, 0.6, 0.3])]
    run = summarise_run(rows, {})
    assert np.allclose(run["reward_smooth"], [0.0, 0.15, 0.3, 0.4])
    assert run["calibration_s"] == 0.0 and run["final_reward"] == pytest.approx(0.4)


def test_rerender_writes_the_report_and_plots_from_results_alone(tmp_path):
    def run(rewards, wall):
        rows = [{"iteration": i, "reward_mean": r, "wall_s": wall * (i + 1), "iteration_s": wall, "nfe_total": 100 * (i + 1), "nfe_rollout": 40, "nfe_dense": 0, "nfe_train": 60}
                for i, r in enumerate(rewards)]
        return summarise_run(rows, {"eval_reward_base": 0.2, "eval_reward_final": rewards[-1]})

    results = {
        "command": "densegrpo bench sparse-vs-dense --quick", "date": "today", "machine": "test", "profile": "quick", "iterations": 3, "seeds": 2,
        "group_size": 4, "groups_per_iteration": 2, "arms": {a: ARMS[a].description for a in ("flow-grpo", "densegrpo")},
        "runs": {"toy-geneval": {"flow-grpo": [run([0.1, 0.2, 0.3], 1.0), run([0.1, 0.3, 0.3], 1.1)], "densegrpo": [run([0.1, 0.4, 0.5], 2.0), run([0.2, 0.4, 0.6], 2.1)]}},
        "costs": {},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = rerender(tmp_path).read_text()
    assert "## toy-geneval" in text and "| flow-grpo |" in text and "| densegrpo |" in text and "Dense wins at equal wall-clock" in text
    assert json.loads((tmp_path / "results.json").read_text())["summary"]["toy-geneval"]["arms"]["densegrpo"]["iterations_to_sparse_final"] == 2
    for name in ("reward_vs_iteration.png", "reward_vs_nfe.png", "reward_vs_wall.png", "psi.png"):
        assert (tmp_path / name).stat().st_size > 1000


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
