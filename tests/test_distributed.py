"""Multi-process training on gloo (torchrun and accelerate launch): world-size invariance with DDP
and FSDP, groups that span ranks, resuming with another number of processes, rank failure."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TESTS = Path(__file__).parent
ROOT = TESTS.parent

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
# A global batch of 8: one group of 8 spans both ranks (each rank holds 4 of its members) ...
SPANNING = [*COMMON, *ANALYTIC, "advantage.name=sparse", "train.group_size=8", "train.groups_per_iteration=1"]
# ... or two groups of 4, one per rank, with dense advantages.
PER_RANK = [*COMMON, *ANALYTIC, "advantage.name=dense", "train.group_size=4", "train.groups_per_iteration=2"]
# The 32 px toy policy (the setting the tolerances below were measured on), 4 steps, one initial
# noise per sample, no evaluation or sample grids, a checkpoint every iteration.
TOY = [
    "sampling.num_steps=4",
    "logging.progress=false",
    "logging.sample_prompts=0",
    "logging.eval_prompts=0",
    "checkpoint_every=1",
    "policy.name=toy",
    "policy.config.resolution=32",
    "train.same_noise_per_group=false",
]
# Full fine-tuning of the toy UNet (random init, 1.7 M weights), sharded with FSDP2 on 2 processes.
TOY_FULL = [
    *TOY,
    "policy.config.weights=random",
    "policy.config.lora.enabled=false",
    "rewards.0.name=loop_components:BrightnessReward",
    "calibrator.name=uniform",
    "advantage.name=sparse",
    "train.group_size=4",
    "train.groups_per_iteration=1",
    "train.learning_rate=0.001",
    "train.data_parallel=fsdp",
]
# The toy world itself: the shipped toy policy with LoRA and the toy-clip reward (continuous, so
# 4-step samples still give every group a spread). lr 5e-4: float32 summation order differs between
# a batch of 8 and two of 4, and AdamW turns that into weight gaps of about 4e-7 here (measured),
# while a missing gradient all-reduce or per-rank group statistics move weights by about lr.
TOY_LORA = [
    *TOY,
    "rewards.0.name=toy-clip",
    "calibrator.name=uniform",
    "train.learning_rate=0.0005",
    "iterations=2",
]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return env


def _sets(items: list[str]) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def _launcher(nproc: int) -> list[str]:
    if nproc == 1:
        return [sys.executable, "-m", "densegrpo", "train"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "densegrpo", "train"]


def _check(process: subprocess.CompletedProcess) -> None:
    assert process.returncode == 0, process.stderr[-3000:]


def _train(out: Path, items: list[str], nproc: int) -> None:
    _check(subprocess.run([*_launcher(nproc), *_sets(items), "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=600))


def _resume(run: Path, items: list[str], nproc: int) -> None:
    _check(subprocess.run([*_launcher(nproc), "--resume", str(run), *_sets(items)], env=_env(), capture_output=True, text=True, timeout=600))


def _checkpoint(run: Path, iteration: int) -> Path:
    return run / "checkpoints" / f"iter-{iteration:06d}"


def _weights(run: Path, iteration: int) -> dict[str, torch.Tensor]:
    return load_file(_checkpoint(run, iteration) / "trainable.safetensors")


def _moments(run: Path, iteration: int) -> list[dict[str, torch.Tensor]]:
    """AdamW's per-parameter state (``exp_avg``, ``exp_avg_sq``, ``step``) in parameter order."""
    state = torch.load(_checkpoint(run, iteration) / "optimizer.pt", weights_only=True)["state"]
    return [state[index] for index in sorted(state)]


def _world_size(run: Path, iteration: int) -> int:
    """Processes that wrote the checkpoint (a launcher that started one process would pass unnoticed otherwise)."""
    return json.loads((_checkpoint(run, iteration) / "state.json").read_text())["world_size"]


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], tol: float = 1e-6) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key], b[key], atol=tol, rtol=0), (key, float((a[key] - b[key]).abs().max()))


def _assert_same_run(one: Path, many: Path, iteration: int) -> None:
    """Same weights and AdamW moments (so the same averaged gradients) to 1e-6; same logged counts."""
    assert (_world_size(one, iteration), _world_size(many, iteration)) == (1, 2)
    _assert_close(_weights(one, iteration), _weights(many, iteration))
    for a, b in zip(_moments(one, iteration), _moments(many, iteration), strict=True):
        _assert_close(a, b)
    rows_one, rows_many = _metrics(one)[:iteration], _metrics(many)
    assert len(rows_many) == iteration  # rank 0 alone writes metrics
    for a, b in zip(rows_one, rows_many):
        assert (a["nfe_rollout"], a["nfe_dense"], a["nfe_train"], a["reward_calls"]) == (b["nfe_rollout"], b["nfe_dense"], b["nfe_train"], b["reward_calls"])
        assert a["reward_mean"] == pytest.approx(b["reward_mean"], rel=1e-6, abs=1e-6)


@pytest.fixture(scope="module")
def spanning(tmp_path_factory) -> Path:
    """The spanning-group run on 1 process (3 iterations) and with torchrun on 2 (2 iterations)."""
    root = tmp_path_factory.mktemp("spanning")
    _train(root / "one", [*SPANNING, "iterations=3"], 1)
    _train(root / "two", [*SPANNING, "iterations=2"], 2)
    return root


@pytest.mark.slow
def test_two_processes_match_one_process_when_a_group_spans_ranks(spanning):
    _assert_same_run(spanning / "one", spanning / "two", 2)


@pytest.mark.slow
def test_two_processes_match_one_process_with_dense_advantages(tmp_path):
    _train(tmp_path / "one", [*PER_RANK, "iterations=2"], 1)
    _train(tmp_path / "two", [*PER_RANK, "iterations=2"], 2)
    _assert_same_run(tmp_path / "one", tmp_path / "two", 2)



@pytest.mark.slow
def test_two_processes_match_one_process_when_zero_advantage_samples_are_dropped(tmp_path):
    """One group per rank; groups of even-length prompts tie, so some iterations drop a whole rank's
    rows: that rank runs one unused row (weight 0) and the other's loss weighs 2, as in one process."""
    tied = [*PER_RANK, "advantage.name=sparse", "rewards.0.name=loop_components:TiedOnEvenPrompts", "iterations=4", "seed=1",
            "prompts.train=toy-train-focus"]  # the prompt set the draws below were read from
    _train(tmp_path / "one", tied, 1)
    _train(tmp_path / "two", tied, 2)
    # seed 1 draws: no tied group, rank 1's group tied, both tied (no optimizer step), rank 1's again
    assert [row["zero_advantage_dropped"] for row in _metrics(tmp_path / "one")] == [0.0, 0.5, 1.0, 0.5]
    _assert_same_run(tmp_path / "one", tmp_path / "two", 4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "advantage, groups",
    [("sparse", ["train.group_size=8", "train.groups_per_iteration=1"]), ("dense", ["train.group_size=4", "train.groups_per_iteration=2"])],
)
def test_toy_world_two_processes_match_one_process(tmp_path, advantage, groups):
    items = [*TOY_LORA, f"advantage.name={advantage}", *groups]
    _train(tmp_path / "one", items, 1)
    _train(tmp_path / "two", items, 2)
    first, second = _weights(tmp_path / "one", 1), _weights(tmp_path / "one", 2)
    moved = max(float((second[k] - first[k]).abs().max()) for k in second)
    assert moved > 1e-4  # the second step really changed the LoRA weights
    _assert_same_run(tmp_path / "one", tmp_path / "two", 2)


@pytest.mark.slow
def test_two_processes_evaluate_like_one_process(tmp_path):
    """Evaluation is sharded over the ranks (9 held-out images: 4 and 5; 3 training-prompt images: 1
    and 2) and chunked; the logged base, final and monitor rewards are the one-process ones."""
    items = [*SPANNING, "iterations=1", "logging.eval_prompts=3", "logging.eval_images_per_prompt=3",
             "logging.train_eval_images_per_prompt=1", "sampling.chunk_size=2",
             "logging.monitor_rewards=[{name: 'loop_components:BrightnessReward', config: {target: 0.2}}]"]
    _train(tmp_path / "one", items, 1)
    _train(tmp_path / "two", items, 2)
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    keys = ["eval_reward_base", "eval_reward", "train_eval_reward_base", "train_eval_reward",
            "monitor_brightnessreward_reward_base", "monitor_brightnessreward_reward"]
    assert all(key in one[-1] or key in one[0] for key in keys)
    for key in keys:
        row = 0 if key.endswith("_base") else -1
        assert two[row][key] == pytest.approx(one[row][key], abs=1e-6), key


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.mark.slow
def test_accelerate_launch_matches_one_process(spanning, tmp_path):
    # accelerate's torchrun-based launcher is --multi_gpu; on a machine without GPUs it runs CPU
    # processes and densegrpo picks gloo. (--cpu with several processes would go to mpirun.)
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()), "-m", "densegrpo", "train",
    ]
    env = {**_env(), "HF_HOME": str(tmp_path / "hf")}  # no accelerate config file from the user's cache
    out = tmp_path / "accelerate"
    _check(subprocess.run([*launcher, *_sets([*SPANNING, "iterations=2"]), "--out", str(out)], env=env, capture_output=True, text=True, timeout=600))
    _assert_same_run(spanning / "one", out, 2)


@pytest.mark.slow
def test_checkpoint_from_two_processes_resumes_on_one(spanning, tmp_path):
    mixed = tmp_path / "mixed"
    shutil.copytree(spanning / "two", mixed)
    _resume(mixed, ["iterations=3"], 1)
    _assert_close(_weights(spanning / "one", 3), _weights(mixed, 3))


@pytest.mark.slow
def test_fsdp_full_fine_tuning_on_two_processes_matches_one_process(tmp_path):
    """A one-process checkpoint resumed with FSDP on 2 processes takes the same step as on 1 process.

    Both continue from the same iteration-1 weights and AdamW state, so the comparison isolates
    one FSDP step: loading full tensors into shards, sharded forward/backward with reduce-scatter,
    the sharded AdamW step, and gathering weights and moments for the checkpoint.
    Splitting the batch over ranks changes the float32 summation order in the UNet's backward, so
    gradients agree to a few 1e-6 of their largest entry, not bit for bit (DDP on the same split
    gives the same gap; docs/distributed.md). AdamW divides by sqrt(v_hat) + 1e-8, and the
    rounding noise of a gradient scales with the largest terms of its sums, not with the entry, so
    the smaller sqrt(v_hat), the more that noise moves the step (up to the learning rate where
    v_hat is near 0). Hence a 1e-6 bound (0.1% of a 1e-3 step) where sqrt(v_hat) > 2e-6 (200 x
    eps; at least 80% of the entries checked) and a 1e-5 bound everywhere. The weight gaps depend
    on the CPU's kernels: one machine measured 7.1e-7 anywhere and 2.0e-7 where sqrt(v_hat) >
    1e-6 (93% of the entries); an AMD EPYC (AVX2) measured one entry of 1.06e-6 at sqrt(v_hat) =
    1.5e-6, and at most 6.4e-7 where sqrt(v_hat) > 2e-6 (86% of the entries).
    """
    _train(tmp_path / "one", [*TOY_FULL, "iterations=1"], 1)
    shutil.copytree(tmp_path / "one", tmp_path / "fsdp")
    # With an evaluation at the end: 3 images over 2 ranks, so the short share pads (every rank runs
    # the same sharded forwards, or the job would hang).
    evaluated = ["iterations=2", "logging.eval_prompts=3", "logging.eval_images_per_prompt=1", "sampling.eval_steps=4"]
    _resume(tmp_path / "one", evaluated, 1)
    _resume(tmp_path / "fsdp", evaluated, 2)
    one, fsdp = tmp_path / "one", tmp_path / "fsdp"
    assert (_world_size(one, 2), _world_size(fsdp, 2)) == (1, 2)
    moments_one, moments_fsdp = _moments(one, 2), _moments(fsdp, 2)
    largest = max(float(m["exp_avg"].abs().max()) for m in moments_one)
    assert largest > 0
    for a, b in zip(moments_one, moments_fsdp, strict=True):
        assert a["exp_avg"].shape == b["exp_avg"].shape and float(a["step"]) == float(b["step"]) == 2.0
        assert float((a["exp_avg"] - b["exp_avg"]).abs().max()) <= 1e-5 * largest
    weights_one, weights_fsdp = _weights(one, 2), _weights(fsdp, 2)
    names = _parameter_order()
    assert sorted(weights_one) == sorted(names) == sorted(weights_fsdp)
    compared = total = 0
    for name, moment in zip(names, moments_one, strict=True):
        assert moment["exp_avg"].shape == weights_one[name].shape
        difference = (weights_one[name] - weights_fsdp[name]).abs()
        assert float(difference.max()) <= 1e-5, name
        conditioned = (moment["exp_avg_sq"] / (1 - 0.999**2)).sqrt() > 2e-6
        if conditioned.any():
            assert float(difference[conditioned].max()) <= 1e-6, name
        compared += int(conditioned.sum())
        total += conditioned.numel()
    assert compared >= 0.8 * total, (compared, total)
    assert [r["nfe_train"] for r in _metrics(one)] == [r["nfe_train"] for r in _metrics(fsdp)]
    assert _metrics(fsdp)[-1]["eval_reward"] == pytest.approx(_metrics(one)[-1]["eval_reward"], abs=1e-4)


def _parameter_order() -> list[str]:
    """Trainable parameter names of the toy UNet in ``named_parameters`` order (the optimizer's order)."""
    from densegrpo.worlds.toy.policy import ToyPolicy

    policy = ToyPolicy(ToyPolicy.Config(weights="random", lora={"enabled": False}))
    return [name for name, p in policy.transformer.named_parameters() if p.requires_grad]


@pytest.mark.slow
def test_killing_one_rank_fails_clearly_and_keeps_a_resumable_checkpoint(tmp_path):
    # minibatch_size counts samples of the global batch: 8 / 4 = 2 optimizer steps per iteration
    # on any number of processes (each rank steps on 2 of its 4 rows).
    items = [*PER_RANK, "train.minibatch_size=4", "iterations=400"]
    out = tmp_path / "run"
    command = [*_launcher(2), *_sets(items), "--out", str(out)]
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
    assert all(float(m["step"]) == 2 * completed for m in _moments(out, completed))
    _resume(out, [f"iterations={completed + 1}"], 1)
