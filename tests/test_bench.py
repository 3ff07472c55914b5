"""The benchmark: arms are component combinations, the report renders from results alone, and
the quick profile runs and writes every artefact."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from densegrpo.bench import (
    ARMS,
    PROFILES,
    Arm,
    Profile,
    arm_config,
    plot_psi,
    rerender,
    run_sparse_vs_dense,
    summarise_run,
    uniform_level,
)
from densegrpo.run import plots


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
    run = summarise_run(rows, {}, seed=0)
    assert np.allclose(run["reward_smooth"], [0.0, 0.15, 0.3, 0.4])
    assert run["calibration_s"] == 0.0 and run["final_reward"] == pytest.approx(0.4)


def test_rerender_writes_the_report_and_plots_from_results_alone(tmp_path):
    def run(rewards, wall, seed):
        rows = [{"iteration": i, "reward_mean": r, "wall_s": wall * (i + 1), "iteration_s": wall, "nfe_total": 100 * (i + 1), "nfe_rollout": 40, "nfe_dense": 0, "nfe_train": 60}
                for i, r in enumerate(rewards)]
        return summarise_run(rows, {"eval_reward_base": 0.2, "eval_reward_final": rewards[-1]}, seed)

    results = {
        "command": "densegrpo bench sparse-vs-dense --quick", "date": "today", "machine": "test", "profile": "quick", "iterations": 3, "seeds": 2,
        "group_size": 4, "groups_per_iteration": 2, "arms": {a: ARMS[a].description for a in ("flow-grpo", "densegrpo")},
        "runs": {"toy-geneval": {"flow-grpo": [run([0.1, 0.2, 0.3], 1.0, 0), run([0.1, 0.3, 0.3], 1.1, 1)],
                                 "densegrpo": [run([0.1, 0.4, 0.5], 2.0, 0), run([0.2, 0.4, 0.6], 2.1, 1)]}},
        "costs": {}, "uniform_level": 0.7,
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    text = rerender(tmp_path).read_text()
    assert "## toy-geneval" in text and "| flow-grpo |" in text and "| densegrpo |" in text and "How to read the claims" in text
    assert "| dense > sparse | densegrpo - flow-grpo | equal wall-clock" in text
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


def test_a_config_naming_a_third_party_policy_runs_and_a_killed_benchmark_resumes_without_redoing_finished_runs(tmp_path):
    """CONFIG names a policy and a reward that are no built-ins (tests/loop_components.py);
    the benchmark is killed for real after its second run and continued with --resume OUT."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import yaml
    from densegrpo.contracts import config as cfg

    tests = Path(__file__).parent
    sys.path.insert(0, str(tests))
    from test_loop import ANALYTIC

    config = tmp_path / "third-party.yaml"
    run = cfg.resolve(None, [*ANALYTIC, "iterations=12", "logging.eval_prompts=2", "logging.sample_prompts=0"])
    config.write_text(yaml.safe_dump(run.model_dump(mode="json")))
    out = tmp_path / "bench"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "densegrpo", "bench", "sparse-vs-dense"]
    arms = ["--arm", "flow-grpo", "--arm", "densegrpo"]
    victim = subprocess.Popen([*command, str(config), *arms, "--seeds", "3", "--out", str(out)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and victim.poll() is None and len(list(out.glob("runs/*/*/seed*/summary.json"))) < 2:
        time.sleep(0.05)
    assert victim.poll() is None, "the benchmark ended before it could be killed; make its runs longer"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    finished = sorted(out.glob("runs/*/*/seed*/summary.json"))
    assert 2 <= len(finished) < 6
    stamps = {path: (path.parent / "metrics.jsonl").stat().st_mtime_ns for path in finished}
    for path in finished:  # ordinary run folders
        assert {"config.yaml", "metrics.jsonl", "summary.json"} <= {p.name for p in path.parent.iterdir()}

    again = subprocess.run([*command, str(config), *arms, "--out", str(out)], env=env, capture_output=True, text=True)
    assert again.returncode == 2 and f"pass --resume {out}" in again.stderr

    resumed = subprocess.run([*command, "--resume", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert {path: (path.parent / "metrics.jsonl").stat().st_mtime_ns for path in finished} == stamps  # not redone
    assert len(list(out.glob("runs/*/*/seed*/summary.json"))) == 6
    results = json.loads((out / "results.json").read_text())
    runs = results["runs"]["loop_components:BrightnessReward"]
    assert [r["seed"] for r in runs["flow-grpo"]] == [0, 1, 2] and [r["seed"] for r in runs["densegrpo"]] == [0, 1, 2]
    claims = results["summary"]["loop_components:BrightnessReward"]["claims"]
    assert {row["claim"] for row in claims} == {"dense > sparse"} and all(row["paired"] and row["n"] == 3 for row in claims)
    assert "| dense > sparse |" in (out / "report.md").read_text()


def test_the_lab_world_runs_through_the_cli_and_its_arms_keep_the_labs_calibration_sizes(tmp_path):
    from densegrpo.bench.arms import world_config
    from densegrpo.cli.app import app
    from typer.testing import CliRunner

    calibrated = world_config("lab", None, "densegrpo", None, 3, PROFILES["default"], None)
    assert (calibrated.policy.name, calibrated.rewards[0].name, calibrated.seed) == ("lab", "lab", 3)
    assert calibrated.calibrator.config == {"max_rounds": 2, "samples_per_round": 32}
    assert world_config("lab", None, "flow-grpo", None, 0, PROFILES["default"], None).calibrator.config == {}
    out = tmp_path / "lab"
    result = CliRunner().invoke(app, ["bench", "sparse-vs-dense", "--world", "lab", "--quick", "--seeds", "2", "--arm", "flow-grpo",
                                      "--arm", "densegrpo", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["world"] == "lab" and results["iterations"] == 2 and results["eval_steps"] == 16
    assert [r["seed"] for r in results["runs"]["lab"]["densegrpo"]] == [0, 1]
    report = (out / "report.md").read_text()
    assert "credit-assignment lab" in report and "ODE samples (16 steps)" in report
    assert "| dense > sparse | densegrpo - flow-grpo |" in report
