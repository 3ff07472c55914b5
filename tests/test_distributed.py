"""Multi-process training with torchrun on gloo: world-size invariance, spanning groups, rank failure."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).parent
ROOT = TESTS.parent

# group_size 4, one group per iteration -> a global batch of 8 with groups of 4: with 2 ranks each
# rank holds 4 rows; with groups_per_iteration=1 and group_size=8 a single group spans both ranks.
COMMON = [
    "sampling.num_steps=4",
    "sampling.eval_steps=4",
    "train.learning_rate=0.05",
    "train.clip_range=0.2",
    "logging.progress=false",
    "logging.sample_prompts=0",
    "logging.eval_prompts=0",
    "calibrator.config.max_rounds=1",
    "calibrator.config.samples_per_round=8",
    "checkpoint_every=1",
]
ANALYTIC = ["policy.name=loop_components:AnalyticPolicy", "rewards.0.name=loop_components:BrightnessReward"]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    env.pop("WORLD_SIZE", None)
    return env


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _train(out: Path, items: list[str], nproc: int, extra: list[str] | None = None) -> subprocess.CompletedProcess:
    if nproc == 1:
        command = [sys.executable, "-m", "densegrpo", "train"]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "densegrpo", "train"]
    return subprocess.run([*command, *_sets(items), "--out", str(out), *(extra or [])], env=_env(), capture_output=True, text=True, timeout=600)


def _weights(run: Path, iteration: int) -> dict[str, torch.Tensor]:
    return load_file(run / "checkpoints" / f"iter-{iteration:06d}" / "trainable.safetensors")


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=tol, rtol=0), (key, float((a[key] - b[key]).abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("advantage, groups", [("sparse", "train.group_size=8 train.groups_per_iteration=1"), ("dense", "train.group_size=4 train.groups_per_iteration=2")])
def test_two_processes_match_one_process(tmp_path, advantage, groups):
    items = [*COMMON, *ANALYTIC, "iterations=2", f"advantage.name={advantage}", *groups.split()]
    one = _train(tmp_path / "one", items, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(tmp_path / "two", items, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    _assert_close(_weights(tmp_path / "one", 2), _weights(tmp_path / "two", 2))
    rows_one = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    rows_two = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_two) == 2  # rank 0 alone writes metrics
    for a, b in zip(rows_one, rows_two):
        assert a["nfe_rollout"] == b["nfe_rollout"] and a["nfe_dense"] == b["nfe_dense"] and a["nfe_train"] == b["nfe_train"]
        assert abs(a["reward_mean"] - b["reward_mean"]) < 1e-6


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_on_one(tmp_path):
    items = [*COMMON, *ANALYTIC, "advantage.name=sparse", "train.group_size=4", "train.groups_per_iteration=2"]
    straight = _train(tmp_path / "straight", [*items, "iterations=3"], 1)
    assert straight.returncode == 0, straight.stderr[-3000:]
    two = _train(tmp_path / "mixed", [*items, "iterations=2"], 2)
    assert two.returncode == 0, two.stderr[-3000:]
    resumed = subprocess.run([sys.executable, "-m", "densegrpo", "train", "--resume", str(tmp_path / "mixed"), "--set", "iterations=3"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _assert_close(_weights(tmp_path / "straight", 3), _weights(tmp_path / "mixed", 3))


@pytest.mark.slow
def test_killing_one_rank_fails_clearly_and_keeps_a_resumable_checkpoint(tmp_path):
    items = [*COMMON, *ANALYTIC, "advantage.name=dense", "train.group_size=4", "train.groups_per_iteration=2", "iterations=400"]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "densegrpo", "train", *_sets(items), "--out", str(out)]
    job = subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and job.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    assert job.poll() is None, "the job ended before a rank could be killed"
    ranks = subprocess.run(["pgrep", "-f", "-P", str(job.pid), "densegrpo"], capture_output=True, text=True).stdout.split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[-1]), signal.SIGKILL)
    _, stderr = job.communicate(timeout=300)
    assert job.returncode != 0
    assert "densegrpo" in stderr and ("FAILED" in stderr or "failed" in stderr.lower())
    latest = (out / "checkpoints" / "latest").read_text().strip()
    saved = load_file(out / "checkpoints" / latest / "trainable.safetensors")
    assert saved and all(torch.isfinite(v).all() for v in saved.values())
    completed = int(latest.split("-")[1])
    resumed = subprocess.run([sys.executable, "-m", "densegrpo", "train", "--resume", str(out), "--set", f"iterations={completed + 1}"], env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
