"""The GRPO loop on the closed-form Gaussian policy: exact first ratio, updates, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError
from densegrpo.run import checkpoint as ckpt
from densegrpo.run.evaluate import paired_gain
from densegrpo.run.hooks import evaluation
from densegrpo.run.hooks.checkpoints import restore
from densegrpo.run.hooks.evaluation import eval_scores, load_eval_base
from densegrpo.run.state import Run
from densegrpo.run.train import run_training, train_step
from safetensors.torch import load_file

TESTS = Path(__file__).parent
ANALYTIC = [
    "policy.name=loop_components:AnalyticPolicy",
    "rewards.0.name=loop_components:BrightnessReward",
    "sampling.num_steps=4",
    "sampling.eval_steps=4",
    "train.group_size=4",
    "train.groups_per_iteration=2",
    "train.learning_rate=0.05",
    "train.clip_range=0.2",
    "logging.progress=false",
    "logging.sample_prompts=2",
    "logging.eval_prompts=4",
    "calibrator.config.max_rounds=1",
    "calibrator.config.samples_per_round=8",
]


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def analytic_config(*extra: str) -> cfg.RunConfig:
    return cfg.resolve(None, [*ANALYTIC, *extra])


@pytest.mark.parametrize("advantage", ["sparse", "dense"])
def test_first_inner_step_ratio_is_one_and_kl_is_zero(tmp_path, advantage):
    trainer = Run(analytic_config(f"advantage.name={advantage}", "train.beta=0.04"), tmp_path)
    record = train_step(trainer)
    assert record["first_step_ratio_dev"] == 0.0
    assert record["ratio_dev_max"] == 0.0  # one optimizer step per iteration: every step sees the old policy
    assert record["kl"] == 0.0 and record["approx_kl"] == 0.0
    assert record["nfe_rollout"] == 8 * 4
    if advantage == "dense":
        assert record["nfe_dense"] == 8 * 4 * 3 // 2  # N * T(T-1)/2 with velocity reuse
        assert len(record["dense_gain_mean"]) == 4
    else:
        assert record["nfe_dense"] == 0


def test_early_steps_only_score_only_their_states_and_train_identically(tmp_path):
    # timestep_fraction 0.5 of T = 4 trains steps 0 and 1, whose gains read x_0, x_1, x_2
    extra = ["train.timestep_fraction=0.5", "calibrator.name=uniform"]
    skipping = Run(analytic_config("advantage.name=dense", *extra), tmp_path / "a")
    every = Run(analytic_config("advantage.name=loop_components:DenseEveryState", *extra), tmp_path / "b")
    for iteration in range(2):
        lean, full = train_step(skipping), train_step(every)
        # completions: x_0 takes 4 - 1 = 3 velocity calls (first one reused), x_1 2, x_2 1, per sample
        assert lean["nfe_dense"] == 8 * (3 + 2 + 1) and full["nfe_dense"] == 8 * 4 * 3 // 2
        assert lean["reward_mean"] == full["reward_mean"]
        assert lean["dense_gain_mean"][:2] == full["dense_gain_mean"][:2]
        assert lean["dense_gain_mean"][2:] == [None, None]
        assert lean["nfe_train"] == full["nfe_train"]
        assert torch.equal(skipping.policy.mu.detach(), every.policy.mu.detach())


def test_evaluation_scores_every_image_of_every_prompt(tmp_path, monkeypatch):
    from loop_components import BrightnessReward

    trainer = Run(analytic_config("logging.eval_prompts=3", "logging.eval_images_per_prompt=4"), tmp_path)
    seen = []
    real = evaluation.eval_images

    def recording(run, prompts, start_index=0):
        seen.append(list(prompts))
        return real(run, prompts, start_index)

    monkeypatch.setattr(evaluation, "eval_images", recording)
    score = float(eval_scores(trainer).mean())
    first_three = [r["prompt"] for r in trainer.test_records[:3]]
    assert seen == [[p for p in first_three for _ in range(4)]]
    # the same prompt's images come from different noise: not one image scored four times
    images = real(trainer, seen[0])
    assert not torch.equal(images[0], images[1])
    assert score == pytest.approx(float(BrightnessReward()(images, seen[0], None).mean()), abs=1e-6)


def test_paired_gain_on_a_hand_computed_example():
    base = torch.tensor([0.5, 1.0, float("nan"), 0.0])
    current = torch.tensor([0.75, 0.5, 1.0, 0.25])
    paired = paired_gain(base, current)  # differences 0.25, -0.5, 0.25 (the NaN pair is dropped)
    assert paired.images == 3 and paired.better == 2 and paired.worse == 1
    assert paired.gain == pytest.approx(0.0, abs=1e-12)
    # sample std sqrt((0.0625 + 0.25 + 0.0625) / 2) = sqrt(0.1875), over sqrt(3)
    assert paired.se == pytest.approx(0.1875**0.5 / 3**0.5, rel=1e-12)
    with pytest.raises(ValueError, match="one shape"):
        paired_gain(base, current[:3])


def test_logged_eval_gain_is_paired_with_the_base_and_survives_resume(tmp_path):
    run = tmp_path / "run"
    sets = ("advantage.name=sparse", "calibrator.name=uniform", "logging.sample_every=2", "checkpoint_every=2", "logging.eval_images_per_prompt=2")
    run_training(analytic_config(*sets, "iterations=2"), run)
    run_training(analytic_config(*sets, "iterations=4"), run, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    base_mean = rows[0]["eval_reward_base"]
    evaluated = [r for r in rows if "eval_reward" in r]
    assert [r["iteration"] for r in evaluated] == [1, 3]
    for r in evaluated:  # no NaN rewards here, so the mean of the differences is the difference of the means
        assert r["eval_gain"] == pytest.approx(r["eval_reward"] - base_mean, abs=1e-5)
    # the last gain's standard error, recomputed with numpy from a fresh evaluation of the checkpoint
    trainer = Run(analytic_config(*sets, "iterations=4"), tmp_path / "again")
    restore(trainer, ckpt.latest(run))
    diff = (eval_scores(trainer) - load_eval_base(run)).double().numpy()
    assert diff.size == 8 and diff.std() > 0
    assert evaluated[-1]["eval_gain_se"] == pytest.approx(diff.std(ddof=1) / np.sqrt(diff.size), rel=1e-4)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_gain_final"] == evaluated[-1]["eval_gain"]


def test_training_prompt_evaluation_scores_the_training_prompts_and_survives_resume(tmp_path, monkeypatch):
    sets = ("advantage.name=sparse", "calibrator.name=uniform", "logging.sample_every=2", "checkpoint_every=2",
            "logging.eval_prompts=3", "logging.eval_images_per_prompt=2", "logging.train_eval_images_per_prompt=3")
    trainer = Run(analytic_config(*sets), tmp_path / "probe")
    seen = []
    real = evaluation.eval_images
    monkeypatch.setattr(evaluation, "eval_images", lambda run, prompts, start=0: (seen.append(list(prompts)), real(run, prompts, start))[1])
    assert eval_scores(trainer, "train").shape == (9,)
    assert seen == [[r["prompt"] for r in trainer.train_records[:3] for _ in range(3)]]
    assert seen[0] != [r["prompt"] for r in trainer.test_records[:3] for _ in range(3)]  # not the held-out prompts

    run = tmp_path / "run"
    run_training(analytic_config(*sets, "iterations=2"), run)
    run_training(analytic_config(*sets, "iterations=4"), run, resume=True)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    base_mean = rows[0]["train_eval_reward_base"]
    assert base_mean == pytest.approx(float(load_eval_base(run, "train_eval").mean()), abs=1e-6)
    evaluated = [r for r in rows if "train_eval_reward" in r]
    assert [r["iteration"] for r in evaluated] == [1, 3]
    for r in evaluated:
        assert r["train_eval_gain"] == pytest.approx(r["train_eval_reward"] - base_mean, abs=1e-5)
        assert r["eval_gain"] == pytest.approx(r["eval_reward"] - rows[0]["eval_reward_base"], abs=1e-5)
        assert np.isfinite(r["train_eval_gain_se"])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_eval_gain_final"] == evaluated[-1]["train_eval_gain"]

    # one default, in LoggingConfig (the toy main job's 16); 0 turns it off: no train_eval keys anywhere
    assert cfg.LoggingConfig().train_eval_images_per_prompt == cfg.default_config().logging.train_eval_images_per_prompt == 16
    plain = tmp_path / "plain"
    run_training(analytic_config(*sets[:-1], "logging.train_eval_images_per_prompt=0", "iterations=2"), plain)
    rows = [json.loads(line) for line in (plain / "metrics.jsonl").read_text().splitlines()]
    assert not any(k.startswith("train_eval") for r in rows for k in r)
    assert not any(k.startswith("train_eval") for k in json.loads((plain / "summary.json").read_text()))
    assert not (plain / "train_eval_base.json").exists()


def test_one_optimizer_step_changes_trainable_and_not_frozen(tmp_path):
    trainer = Run(analytic_config("advantage.name=sparse"), tmp_path)
    mu_before = trainer.policy.mu.detach().clone()
    std_before = trainer.policy.log_std.detach().clone()
    train_step(trainer)
    assert not torch.equal(trainer.policy.mu.detach(), mu_before)
    assert torch.equal(trainer.policy.log_std.detach(), std_before)


def test_second_iteration_sees_a_changed_policy_and_reference_stays_base(tmp_path):
    trainer = Run(analytic_config("advantage.name=sparse", "train.beta=0.04"), tmp_path)
    train_step(trainer)
    record = train_step(trainer)
    assert record["kl"] > 0.0  # the policy moved away from the base model
    with trainer.policy.reference():
        assert torch.equal(trainer.policy.mu.detach(), torch.zeros_like(trainer.policy.mu))


def test_training_raises_reward_on_the_analytic_problem(tmp_path):
    summary = run_training(analytic_config("advantage.name=dense", "iterations=25", "checkpoint_every=0", "train.beta=0"), tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward_mean"] for r in rows[:3]) / 3
    last = sum(r["reward_mean"] for r in rows[-3:]) / 3
    assert last > first + 0.02, (first, last)
    for key in ("iteration", "reward_mean", "reward_std", "noise_level", "approx_kl", "clipfrac", "zero_std_ratio", "nan_rewards", "nfe_rollout", "nfe_dense", "nfe_train", "wall_s", "dense_gain_mean", "dense_gain_pos_frac"):
        assert key in rows[-1], key
    run = tmp_path / "run"
    assert (run / "reward_curve.png").exists() and (run / "calibration.png").exists()
    assert list((run / "samples").glob("*.png")) and (run / "checkpoints" / "latest").exists()
    assert summary["iterations"] == 25


def _cli(args, env):
    return subprocess.Popen([sys.executable, "-m", "densegrpo", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    sets = [a for item in [*ANALYTIC, "iterations=8", "checkpoint_every=2", "advantage.name=dense", "logging.eval_prompts=0", "logging.sample_prompts=0"] for a in ("--set", item)]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    done = _cli(["train", *sets, "--out", str(straight)], env)
    assert done.wait(timeout=300) == 0, done.stderr.read()
    victim = _cli(["train", *sets, "--out", str(killed)], env)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if len(lines) >= 5 or victim.poll() is not None:
            break
        time.sleep(0.02)
    assert victim.poll() is None, "the run ended before it could be killed; make it longer"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert (killed / "checkpoints" / "latest").exists()
    resumed = _cli(["train", "--resume", str(killed)], env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    a = load_file(straight / "checkpoints" / "iter-000008" / "trainable.safetensors")
    b = load_file(killed / "checkpoints" / "iter-000008" / "trainable.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["iteration"] for r in rows] == list(range(8))
    ref = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward_mean"] for r in rows] == [r["reward_mean"] for r in ref]


def test_existing_run_folder_is_not_overwritten(tmp_path):
    run_training(analytic_config("iterations=1", "advantage.name=sparse", "calibrator.name=uniform"), tmp_path / "run")
    from densegrpo.contracts.errors import UserError

    with pytest.raises(UserError, match="--resume"):
        run_training(analytic_config("iterations=1", "advantage.name=sparse", "calibrator.name=uniform"), tmp_path / "run")


@pytest.mark.parametrize("advantage", ["sparse", "dense"])
def test_multi_reward_sum_of_advantages_equals_weighted_per_reward_advantages(tmp_path, advantage):
    from densegrpo.contracts import registry
    from densegrpo.contracts.protocols import RewardBatch
    from densegrpo.method.grpo import rollout
    from densegrpo.method.rewarding import score
    from densegrpo.run.batches import TRAIN_STREAM

    data = cfg.resolve(None, [*ANALYTIC, f"advantage.name={advantage}"]).model_dump(mode="json")
    data["rewards"].append({"name": "loop_components:BrightnessReward", "weight": 0.5, "config": {"target": 0.2}})
    data["reward_combine"] = "sum-advantages"
    config = cfg.validate(data)
    trainer = Run(config, tmp_path)
    plan = trainer.plans[False]
    assert plan.per_reward and plan.dense == (advantage == "dense")
    batch = trainer.batches.draw(0, TRAIN_STREAM, 2, 4, False)
    traj = rollout(trainer.policy, trainer.parts.sampler, batch, trainer.sigmas, trainer.parts.calibrator.noise_level(trainer.sigmas))
    scores = score(trainer.policy, traj, trainer.scorer(batch), plan, trainer.world, 4, 1.0)
    per_reward = scores.for_estimator
    assert per_reward.terminal.shape == (8, 2)
    combined = trainer.parts.advantage(per_reward)
    estimator = registry.load("advantages", advantage)
    expected = torch.zeros_like(combined)
    for r, weight in enumerate([1.0, 0.5]):
        dense = per_reward.dense[..., r] if advantage == "dense" else None
        expected += weight * estimator(RewardBatch(per_reward.terminal[:, r], dense, 4, 4))
    assert torch.allclose(combined, expected, atol=1e-6)
    # the weighted terminal reward is the sum of the columns with the weights
    assert torch.allclose(scores.terminal, per_reward.terminal @ torch.tensor([1.0, 0.5]), atol=1e-6)
    summed = RewardBatch(scores.terminal, scores.dense.rewards if advantage == "dense" else None, 4, 4)
    assert not torch.allclose(combined, estimator(summed), atol=1e-3)
    record = train_step(trainer)
    assert record["reward_mean"] == record["reward_mean"]  # finite


def test_sde_window_choice_follows_the_loop_generator_for_exact_resume():
    from densegrpo.contracts import registry
    from densegrpo.method.noise import generator_for

    sampler = registry.load("samplers", "sde-window", {"window_size": 2})
    starts = [sampler.window(10, generator=generator_for(0, 1, it))[0] for it in range(20)]
    sampler.calls = 123  # the internal counter plays no part when a generator is given
    assert starts == [sampler.window(10, generator=generator_for(0, 1, it))[0] for it in range(20)]
    assert len(set(starts)) > 1


def test_ema_weights_are_used_for_evaluation_and_trained_weights_restored(tmp_path):
    trainer = Run(analytic_config("advantage.name=sparse", "calibrator.name=uniform", "train.ema_decay=0.5"), tmp_path)
    train_step(trainer)
    trained = trainer.policy.mu.detach().clone()
    seen = []
    original = trainer.policy.load_trainable_state_dict

    def spy(state):
        seen.append({k: v.clone() for k, v in state.items()})
        original(state)

    trainer.policy.load_trainable_state_dict = spy
    eval_scores(trainer)
    assert torch.equal(seen[0]["mu"], trainer.ema.state["mu"]) and not torch.equal(trainer.ema.state["mu"], trained)
    assert torch.equal(trainer.policy.mu.detach(), trained)


def test_tensorboard_scalars_match_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_training(analytic_config("iterations=3", "advantage.name=dense", "calibrator.name=uniform", "logging.tensorboard=true"), run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = events.Scalars("reward_mean")
    assert [e.step for e in logged] == [0, 1, 2]
    assert [e.value for e in logged] == pytest.approx([r["reward_mean"] for r in rows], rel=1e-6)
    per_step = events.Scalars("noise_level/k1")
    assert [e.value for e in per_step] == pytest.approx([r["noise_level"][1] for r in rows], rel=1e-6)
    assert "eval_gain" in events.Tags()["scalars"]


def test_tensorboard_without_the_package_is_a_clear_error(tmp_path, monkeypatch):
    from densegrpo.contracts.errors import UserError
    from densegrpo.run.hooks.tensorboard import open_tensorboard

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    with pytest.raises(UserError, match="pip install 'densegrpo\\[tensorboard\\]'"):
        open_tensorboard(tmp_path)


def test_user_hooks_from_the_config_and_from_python_run_before_metrics_are_written(tmp_path):
    from loop_components import RecordingHook

    added = RecordingHook(RecordingHook.Config(tag="python"))
    config = analytic_config("iterations=2", "advantage.name=sparse", "calibrator.name=uniform")
    data = config.model_dump(mode="json")
    data["hooks"] = [{"name": "loop_components:RecordingHook", "config": {"tag": "configured"}}]
    summary = run_training(cfg.validate(data), tmp_path / "run", hooks=[added])
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["configured_iteration"] for r in rows] == [0, 1]
    assert [r["python_iteration"] for r in rows] == [0, 1]
    assert added.calls == ["before", "after", "after", "end"]
    assert summary["python_calls"] == 4 and json.loads((tmp_path / "run" / "summary.json").read_text())["configured_calls"] == 4


def test_a_hook_with_only_some_methods_gets_the_declared_no_op_defaults(tmp_path):
    class CountIterations:
        seen = 0

        def after_iteration(self, run, record):
            CountIterations.seen += 1

    run_training(analytic_config("iterations=2", "advantage.name=sparse", "calibrator.name=uniform"), tmp_path / "run", hooks=[CountIterations()])
    assert CountIterations.seen == 2


def test_the_loss_forward_passes_and_only_they_run_inside_loss_forward(tmp_path):
    trainer = Run(analytic_config("policy.name=loop_components:LossForwardSpy", "advantage.name=sparse", "calibrator.name=uniform", "train.beta=0.04"), tmp_path)
    policy = trainer.policy
    policy.counts.update(loss=0, other=0)
    record = train_step(trainer)
    # T = 4 steps, 3 trained (timestep_fraction 0.99); one batched call per step for the policy, one for the reference
    assert policy.counts["loss"] == 3 * 2 and record["nfe_train"] == 8 * 3 * 2
    assert policy.counts["other"] == 4  # the rollout's T velocity calls; no dense engine for the sparse estimator
    assert policy.cfg_grad == "conditional"  # train.cfg_grad, Flow-GRPO's default
    trainer.config.train.cfg_grad = "both"
    train_step(trainer)
    assert policy.cfg_grad == "both"


def test_samples_with_zero_advantages_everywhere_are_dropped_and_logged(tmp_path):
    """A constant reward: every group has zero spread, every advantage is 0, so every sample is dropped and
    no optimizer step is made; with the switch off they stay in the loss (zero gradient, one AdamW step)."""
    constant = ["rewards.0.name=loop_components:ConstantReward", "advantage.name=sparse", "calibrator.name=uniform"]
    dropping = Run(analytic_config(*constant), tmp_path / "on")
    record = train_step(dropping)
    assert record["zero_advantage_dropped"] == 1.0 and record["nfe_train"] == 0
    assert not dropping.learner.optimizer.state
    keeping = Run(analytic_config(*constant, "train.drop_zero_advantage=false"), tmp_path / "off")
    record = train_step(keeping)
    assert record["zero_advantage_dropped"] == 0.0 and record["nfe_train"] == 8 * 3 * 2
    assert keeping.learner.optimizer.state
    varied = train_step(Run(analytic_config("advantage.name=sparse", "calibrator.name=uniform"), tmp_path / "varied"))
    assert varied["zero_advantage_dropped"] == 0.0 and varied["nfe_train"] == 8 * 3 * 2


def test_the_run_limits_the_calibrator_to_the_sampler_noise_range(tmp_path):
    run = Run(analytic_config("sampler.name=cps"), tmp_path / "cps")
    assert run.parts.calibrator.bounds == (0.0, 1.0)
    assert Run(analytic_config(), tmp_path / "sde").parts.calibrator.bounds == (0.0, 1.5)
    with pytest.raises(UserError, match="noise_level 1.2 lies outside"):
        Run(analytic_config("sampler.name=cps", "calibrator.name=uniform", "calibrator.config.noise_level=1.2"), tmp_path / "bad")


def test_zero_noise_steps_are_logged_as_untrained_and_warned_about_once(tmp_path):
    run = Run(analytic_config("advantage.name=sparse", "calibrator.name=uniform", "calibrator.config.noise_level=0.0"), tmp_path)
    with pytest.warns(UserWarning, match=r"noise level 0 at step\(s\) \[0, 1, 2\]") as caught:
        records = [train_step(run), train_step(run)]
    assert len([w for w in caught if "noise level 0" in str(w.message)]) == 1
    assert [r["untrained_zero_noise_steps"] for r in records] == [3, 3]  # T = 4, the last step untrained anyway
    assert train_step(Run(analytic_config("advantage.name=sparse", "calibrator.name=uniform"), tmp_path / "a"))["untrained_zero_noise_steps"] == 0


@pytest.mark.parametrize("dense, step_local, per_reward", [(False, False, False), (True, True, False), (True, False, True)])
def test_the_scoring_plan_follows_what_the_estimator_and_calibrator_declare(dense, step_local, per_reward):
    from densegrpo.contracts.protocols import RewardNeeds
    from densegrpo.method.rewarding import plan_scoring

    needs = RewardNeeds(dense=dense, completion=2 if dense else "t", step_local=step_local, per_reward=per_reward)
    plain, calibrating = plan_scoring(needs, False), plan_scoring(needs, True)
    assert plain.dense == dense and plain.step_local == step_local and plain.per_reward == per_reward
    assert plain.completion == (2 if dense else "t") and plain.estimator_dense == dense
    # online calibration needs every state's gain: dense, nothing skipped, and for a sparse estimator bought for the calibrator
    assert calibrating.dense and not calibrating.step_local and calibrating.estimator_dense == dense
