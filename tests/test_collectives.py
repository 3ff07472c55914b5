"""Collectives on the backend's device, evaluation sharded over ranks, the collective timeout.

NCCL serves CUDA tensors only: a CPU tensor handed to it raises "No backend type associated with
device type cpu". This machine has no GPU, so a fake process group (torch's ``FakeProcessGroup``,
which communicates nothing) registered for one device type stands in for it. The device it serves
must exist here for a collective to go through: ``meta`` does (a tensor with a shape and no data),
so a meta-only group plays the GPU-only backend; the copy back of the result then fails for want of
data, which shows the collective itself went through. A cuda-only group reproduces NCCL's refusal
exactly, and runs the whole round trip where CUDA exists. Results are checked with two real gloo
processes, against closed forms and against one process.
"""

from __future__ import annotations

import math
import multiprocessing
import os
import re
import socket
import sys
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import torch
import torch.distributed as dist
from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError
from densegrpo.method.distributed import DataParallel, World, init_world, served_device_types, shutdown
from loop_components import AnalyticPolicy
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeProcessGroup, FakeStore

TESTS = Path(__file__).parent
PACKAGE = TESTS.parent / "toolkit" / "densegrpo"


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))


def _fake_backend(common_opts: Any, backend_opts: Any) -> Any:
    return FakeProcessGroup._create_internal(common_opts.group_rank, common_opts.group_size, backend_opts)


@contextmanager
def fake_group(devices: list[str]) -> Iterator[World]:
    """Rank 0 of a 2-process world on a fake backend that serves ``devices`` only."""
    name = "fake_" + "_".join(devices)
    if name not in dist.Backend.backend_list:
        dist.Backend.register_backend(name, _fake_backend, extended_api=True, devices=devices)
    dist.init_process_group(name, rank=0, world_size=2, store=FakeStore())
    try:
        yield World(rank=0, world_size=2)
    finally:
        dist.destroy_process_group()


def spy_on_collectives(monkeypatch) -> list[torch.device]:
    """Record the device of every tensor handed to ``all_gather`` / ``all_reduce``, then run them."""
    issued: list[torch.device] = []
    all_gather, all_reduce = dist.all_gather, dist.all_reduce

    def gather(parts, tensor, *args, **kwargs):
        issued.extend([tensor.device, *(p.device for p in parts)])
        return all_gather(parts, tensor, *args, **kwargs)

    def reduce(tensor, *args, **kwargs):
        issued.append(tensor.device)
        return all_reduce(tensor, *args, **kwargs)

    monkeypatch.setattr(dist, "all_gather", gather)
    monkeypatch.setattr(dist, "all_reduce", reduce)
    return issued


# Every collective of World, called as rank 0 of 2 with CPU inputs (what the callers pass: the
# reward scorer returns CPU scores, the counters are Python numbers).
OPERATIONS: dict[str, Callable[[World], Any]] = {
    "gather": lambda world: world.gather(torch.arange(6, dtype=torch.float16).reshape(3, 2)),
    "gather_split": lambda world: world.gather_split(torch.arange(2, dtype=torch.float32), 5),  # rank 0's 2 of 5 rows
    "sum": lambda world: world.sum(3.0),
    "max": lambda world: world.max(3.0),
    "barrier": lambda world: world.barrier(),
}


def test_the_fake_gpu_backend_refuses_cpu_tensors_as_nccl_does():
    with fake_group(["cuda"]):
        assert served_device_types() == ("cuda",)
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.zeros(1))


@pytest.mark.parametrize(
    "served, given, expected",
    [
        (["cuda"], None, "cuda"),  # NCCL: a number goes to the current GPU
        (["cuda"], "cpu", "cuda"),  # ... and so does a CPU tensor
        (["cuda"], "cuda:1", "cuda"),  # a GPU tensor goes to (stays on) the rank's current GPU
        (["cpu", "cuda"], "cpu", "cpu"),  # gloo: a CPU tensor is not copied
        (["cpu", "cuda"], "cuda:0", "cuda"),  # nor one on the current GPU
        (["cpu", "cuda"], None, "cpu"),
        (["meta"], "cpu", "meta"),  # any backend: its own device type, whatever its name
    ],
)
def test_collective_device_is_one_the_backend_serves(served, given, expected):
    with fake_group(served) as world:
        device = world.collective_device(None if given is None else torch.device(given))
    assert device == torch.device(expected)


@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_every_collective_reaches_a_gpu_only_backend_on_the_device_it_serves(operation, monkeypatch):
    """Before the fix every one of these raised NCCL's "No backend type associated with device
    type cpu": ``gather`` passed its CPU tensor as given, and ``sum``, ``max`` and ``barrier``
    chose the CPU because the backend is not named "nccl". Now each collective is issued on the
    served device; only the meta stand-in's missing data stops the way back."""
    issued = spy_on_collectives(monkeypatch)
    with fake_group(["meta"]) as world:
        with pytest.raises((NotImplementedError, RuntimeError), match="meta tensor"):
            OPERATIONS[operation](world)
    assert issued and {device.type for device in issued} == {"meta"}


def _score_rewards(world: World, dense: bool) -> Any:
    """``rewarding.score`` of 4 ODE trajectories of the analytic policy (the training path's gathers)."""
    from densegrpo.contracts import registry
    from densegrpo.method.reward_scorer import RewardScorer, WeightedReward
    from densegrpo.method.rewarding import ScoringPlan, score
    from densegrpo.method.sigmas import make_sigmas
    from loop_components import BrightnessReward

    policy, prompts = AnalyticPolicy(), ["a", "b", "c", "d"]
    traj = registry.load("samplers", "ode").rollout(policy, policy.encode(prompts), torch.randn(4, 3, 4, 4), make_sigmas(3, 3.0), torch.zeros(3))
    scorer = RewardScorer([WeightedReward("brightness", 1.0, BrightnessReward())], prompts, [None] * 4)
    return score(policy, traj, scorer, ScoringPlan(dense=dense, estimator_dense=dense), world, 4, 1.0)


# Where the loop reaches the other ranks, through World: rewards (sparse and dense), preemption.
CALL_SITES: dict[str, Callable[[World], Any]] = {
    "sparse rewards": lambda world: _score_rewards(world, dense=False),
    "dense rewards": lambda world: _score_rewards(world, dense=True),
    "preemption": lambda world: __import__("densegrpo.run.preemption", fromlist=["Preemption"]).Preemption(Path(".")).requested(world),
}


@pytest.mark.parametrize("site", sorted(CALL_SITES))
def test_the_loops_collectives_reach_a_gpu_only_backend_on_the_device_it_serves(site, monkeypatch):
    issued = spy_on_collectives(monkeypatch)
    with fake_group(["meta"]) as world:
        with pytest.raises((NotImplementedError, RuntimeError), match="meta tensor"):
            CALL_SITES[site](world)
    assert issued and {device.type for device in issued} == {"meta"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the round trip through a cuda-only group needs CUDA")
@pytest.mark.parametrize("operation", sorted(OPERATIONS))
def test_collectives_on_a_cuda_only_backend_hand_back_what_callers_expect(operation, monkeypatch):
    issued = spy_on_collectives(monkeypatch)
    with fake_group(["cuda"]) as world:
        result = OPERATIONS[operation](world)
    assert issued and {device.type for device in issued} == {"cuda"}
    if operation == "gather":  # the fake group leaves the other rank's rows unset: check this rank's
        local = torch.arange(6, dtype=torch.float16).reshape(3, 2)
        assert (result.device, result.dtype, result.shape) == (local.device, local.dtype, (6, 2))
        assert torch.equal(result[:3], local)
    elif operation == "gather_split":
        assert (result.device, result.dtype, result.shape) == (torch.device("cpu"), torch.float32, (5,))
        assert torch.equal(result[:2], torch.arange(2, dtype=torch.float32))
    elif operation in ("sum", "max"):
        assert result == 3.0  # the fake all-reduce leaves this rank's value
    else:
        assert result is None


def test_ddp_refuses_a_policy_on_a_device_the_backend_does_not_serve():
    with fake_group(["cuda"]) as world:
        with pytest.raises(UserError, match=r"weights are on cpu, but .* serves cuda only.*--set device=cuda"):
            DataParallel(world, "ddp").wrap(nn.Linear(2, 2))


COLLECTIVE_CALL = re.compile(
    r"\b(?:torch\.distributed|torch_dist|dist)\.(?:all_gather\w*|all_reduce\w*|reduce_scatter\w*|all_to_all\w*|"
    r"broadcast\w*|barrier|monitored_barrier|gather\w*|scatter\w*|reduce|send|recv|isend|irecv)\s*\("
)


def test_raw_collectives_live_in_method_distributed_only():
    """Every other module reaches the other ranks through World (or DTensor, whose collectives run on
    the mesh's device), so World's device handling covers them all."""
    assert COLLECTIVE_CALL.search("torch_dist.all_gather(parts, x)") and not COLLECTIVE_CALL.search("world.gather(x)")
    found = [
        f"{path.relative_to(PACKAGE)}: {match.group(0)}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for match in COLLECTIVE_CALL.finditer(path.read_text(encoding="utf-8"))
    ]
    assert found and all(line.startswith(str(Path("method") / "distributed.py")) for line in found), found


def test_run_training_passes_the_configured_timeout_to_init_world(monkeypatch, tmp_path):
    import densegrpo.run.train as train

    class Stop(Exception):
        pass

    def fake_init_world(timeout_s):
        raise Stop(timeout_s)

    monkeypatch.setattr(train, "init_world", fake_init_world)
    config = cfg.resolve(None, ["collective_timeout_s=123.5"])
    with pytest.raises(Stop) as stopped:
        train.run_training(config, tmp_path / "run")
    assert stopped.value.args == (123.5,)
    assert cfg.RunConfig().collective_timeout_s == 1800.0  # 30 minutes; torch's NCCL default is 10


# -- two gloo processes -------------------------------------------------------------------------

EVAL = [
    "policy.name=test_collectives:CountingPolicy",
    "rewards.0.name=loop_components:BrightnessReward",
    "sampling.eval_steps=3",
    "advantage.name=sparse",
    "calibrator.name=uniform",
    "train.group_size=2",
    "train.groups_per_iteration=2",
    "logging.progress=false",
    "logging.eval_prompts=3",
    "logging.eval_images_per_prompt=2",  # 6 held-out images: 3 per rank
    "logging.train_eval_images_per_prompt=3",  # 9 training-prompt images: 4 and 5
    "logging.monitor_rewards=[{name: 'loop_components:BrightnessReward', config: {target: 0.2}}]",
]


class CountingPolicy(AnalyticPolicy):
    """The analytic policy, recording the prompts it encodes and the rows of every model call and decode."""

    def __init__(self, config=None):
        super().__init__(config)
        self.encoded: list[str] = []
        self.velocity_rows: list[int] = []
        self.decoded_rows: list[int] = []

    def encode(self, prompts):
        self.encoded.extend(prompts)
        return super().encode(prompts)

    def velocity(self, x, sigma, cond):
        self.velocity_rows.append(int(x.shape[0]))
        return super().velocity(x, sigma, cond)

    def decode(self, x0):
        self.decoded_rows.append(int(x0.shape[0]))
        return super().decode(x0)


def evaluate_both(run_dir: Path, world: World | None = None, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Both evaluations of :data:`EVAL` (the held-out one with its monitor), and what the policy saw."""
    from densegrpo.run.hooks.evaluation import EvaluationHook
    from densegrpo.run.monitors import Monitors
    from densegrpo.run.state import Run

    run = Run(cfg.resolve(None, [*EVAL, *extra]), run_dir, world)
    hook = EvaluationHook()
    hook.monitors = Monitors.build(run.config.logging.monitor_rewards)
    test_scores, monitored = hook.evaluate(run, "test")
    encoded_test = list(run.policy.encoded)
    train_scores, _ = hook.evaluate(run, "train")
    return {
        "test": test_scores, "monitor": monitored["brightnessreward"], "train": train_scores,
        "encoded_test": encoded_test, "encoded_train": run.policy.encoded[len(encoded_test):],
        "velocity_rows": run.policy.velocity_rows, "decoded_rows": run.policy.decoded_rows,
    }


def benchmark_report(world: World | None = None, chunk_size: int | None = None) -> dict[str, Any]:
    """``evaluate_policy`` (what ``densegrpo eval`` runs) on 5 toy-test prompts, scored by brightness,
    with the prompts the policy encoded and the rows of its model calls."""
    from densegrpo.run.evaluate import BENCHMARKS, Benchmark, evaluate_policy

    BENCHMARKS["brightness"] = Benchmark(prompts="toy-test", reward="loop_components:BrightnessReward")
    policy = CountingPolicy()
    try:
        report = evaluate_policy(policy, "brightness", steps=3, per_prompt=1, limit=5, chunk_size=chunk_size, world=world)
    finally:
        del BENCHMARKS["brightness"]
    return {"report": report, "encoded": policy.encoded, "velocity_rows": policy.velocity_rows}


def _rank_checks(world: World, tmp: Path) -> dict[str, Any]:
    """What each rank of the 2-process job measures (see test_two_gloo_processes)."""
    out: dict[str, Any] = {"served": served_device_types()}
    out["timeout_s"] = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu")).options._timeout.total_seconds()
    r = world.rank
    for dtype in (torch.float32, torch.bfloat16, torch.int64):
        out[f"gather_{dtype}"] = world.gather(torch.full((2, 3), 10 * r + 1).to(dtype))
    share = world.split(5)
    out["split_5"] = (share.start, share.stop)
    out["gather_split_5"] = world.gather_split(torch.arange(share.start, share.stop, dtype=torch.float32) * 10, 5)
    share = world.split(1)  # rank 0's share is empty
    out["gather_split_1"] = world.gather_split(torch.full((share.stop - share.start, 2), 7.0), 1)
    out["sum"], out["max"] = world.sum(r + 1.5), world.max(10.0 * r - 3)
    world.barrier()
    out["evaluation"] = evaluate_both(tmp / f"eval-{r}", world)
    out["benchmark"] = benchmark_report(world)
    # Sharded weights (FSDP) need the same forwards on every rank: the short share pads its last row.
    from densegrpo.method.distributed import DataParallel as Parallel

    Parallel.sharded = property(lambda self: True)  # this process only, after everything else
    out["evaluation_sharded"] = evaluate_both(tmp / f"eval-sharded-{r}", world, ("sampling.chunk_size=2",))
    return out


def _rank_main(rank: int, world_size: int, port: int, tmp: str) -> None:
    os.environ.update({"WORLD_SIZE": str(world_size), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    world = init_world(timeout_s=97.0)
    try:
        result = _rank_checks(world, Path(tmp))
        torch.save(result, Path(tmp) / f"rank{rank}.pt")
    except BaseException:
        (Path(tmp) / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        shutdown(world)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict[str, Any]]:
    """Both ranks' :func:`_rank_checks`, from two spawned processes joined over gloo by ``init_world``."""
    tmp = tmp_path_factory.mktemp("ranks")
    context = multiprocessing.get_context("spawn")
    port = _free_port()
    saved_path = list(sys.path)
    sys.path.insert(0, str(TESTS))  # the children import this module and loop_components by name
    try:
        processes = [context.Process(target=_rank_main, args=(rank, 2, port, str(tmp))) for rank in range(2)]
        for process in processes:
            process.start()
        for process in processes:
            process.join(timeout=300)
    finally:
        sys.path[:] = saved_path
    errors = [(tmp / f"rank{rank}.err").read_text() for rank in range(2) if (tmp / f"rank{rank}.err").exists()]
    assert not errors, errors[0]
    assert [process.exitcode for process in processes] == [0, 0]
    return [torch.load(tmp / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.slow  # two fresh processes (shared by these tests)
def test_two_gloo_processes_gather_sum_max_and_split_exactly(two_ranks):
    for out in two_ranks:
        assert "cpu" in out["served"] and out["timeout_s"] == 97.0
        for dtype in (torch.float32, torch.bfloat16, torch.int64):
            gathered = out[f"gather_{dtype}"]
            assert gathered.dtype == dtype and gathered.device == torch.device("cpu")
            assert torch.equal(gathered, torch.tensor([1] * 6 + [11] * 6).reshape(4, 3).to(dtype))
        assert torch.equal(out["gather_split_5"], torch.arange(5, dtype=torch.float32) * 10)
        assert torch.equal(out["gather_split_1"], torch.full((1, 2), 7.0))
        assert out["sum"] == 1.5 + 2.5 and out["max"] == 7.0
    assert [out["split_5"] for out in two_ranks] == [(0, 2), (2, 5)]


@pytest.fixture(scope="module")
def one_process(tmp_path_factory) -> dict[str, Any]:
    return evaluate_both(tmp_path_factory.mktemp("one"))


@pytest.mark.slow  # two fresh processes (shared by these tests)
def test_each_rank_samples_its_half_of_the_evaluation_and_the_gathered_scores_are_one_process_scores(two_ranks, one_process):
    test_prompts = one_process["encoded_test"]
    train_prompts = one_process["encoded_train"]
    assert (len(test_prompts), len(train_prompts)) == (6, 9)  # 3 prompts x 2 images, 3 prompts x 3 images
    ranks = [out["evaluation"] for out in two_ranks]
    # each image generated once: rank 0 the first half, rank 1 the rest, nothing twice
    assert [len(e["encoded_test"]) for e in ranks] == [3, 3] and [len(e["encoded_train"]) for e in ranks] == [4, 5]
    assert ranks[0]["encoded_test"] + ranks[1]["encoded_test"] == test_prompts
    assert ranks[0]["encoded_train"] + ranks[1]["encoded_train"] == train_prompts
    for evaluated in ranks:
        for key in ("test", "monitor", "train"):
            assert evaluated[key].shape == one_process[key].shape
            torch.testing.assert_close(evaluated[key], one_process[key], rtol=0, atol=1e-6)
    # the images really differ (noise by global index), so a misplaced row would show
    assert one_process["test"].unique().numel() == 6


@pytest.mark.slow  # two fresh processes (shared by these tests)
def test_with_sharded_weights_every_rank_runs_the_same_forwards_and_the_scores_still_match(two_ranks, one_process):
    ranks = [out["evaluation_sharded"] for out in two_ranks]
    # 9 training-prompt images: shares of 4 and 5, the short one padded to 5, in chunks of 2 rows
    assert [len(e["encoded_train"]) for e in ranks] == [5, 5]
    assert ranks[0]["velocity_rows"] == ranks[1]["velocity_rows"]  # the same model calls, row counts included
    assert max(ranks[0]["velocity_rows"]) == 2 and max(ranks[0]["decoded_rows"]) == 2
    for evaluated in ranks:
        for key in ("test", "monitor", "train"):
            torch.testing.assert_close(evaluated[key], one_process[key], rtol=0, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_chunked_evaluation_scores_equal_unchunked_ones(tmp_path, one_process, chunk_size):
    chunked = evaluate_both(tmp_path, extra=(f"sampling.chunk_size={chunk_size}",))
    assert max(chunked["velocity_rows"]) == min(chunk_size, 9) and max(chunked["decoded_rows"]) == min(chunk_size, 9)
    assert chunked["encoded_test"] == one_process["encoded_test"]
    for key in ("test", "monitor", "train"):
        torch.testing.assert_close(chunked[key], one_process[key], rtol=0, atol=1e-6)
    calls = math.ceil(6 / chunk_size) + math.ceil(9 / chunk_size)
    assert len(chunked["decoded_rows"]) == calls and sum(chunked["decoded_rows"]) == 15


@pytest.mark.slow  # two fresh processes (shared by these tests)
def test_benchmark_evaluation_is_sharded_and_chunked_like_the_run_evaluation(two_ranks):
    one = benchmark_report()
    chunked = benchmark_report(chunk_size=2)
    assert len(one["encoded"]) == 5 and max(one["velocity_rows"]) == 5 and max(chunked["velocity_rows"]) == 2
    ranks = [out["benchmark"] for out in two_ranks]
    assert [len(r["encoded"]) for r in ranks] == [2, 3] and ranks[0]["encoded"] + ranks[1]["encoded"] == one["encoded"]
    for report in (chunked["report"], ranks[0]["report"], ranks[1]["report"]):
        assert report["images"] == 5 and report["per_tag"].keys() == one["report"]["per_tag"].keys()
        assert report["overall"]["score"] == pytest.approx(one["report"]["overall"]["score"], abs=1e-6)
        for tag, values in report["per_tag"].items():
            assert values["score"] == pytest.approx(one["report"]["per_tag"][tag]["score"], abs=1e-6)
