"""Faults on the main path, each injected for real: damaged checkpoints, a second writer, a full
disk while checkpointing, reward plugins that fail, and SIGTERM/SIGINT during training
(issue 20; docs/faults.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from densegrpo.cli.app import app, main
from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError
from densegrpo.method.reward_scorer import RewardScorer, WeightedReward
from densegrpo.run import checkpoint as ckpt
from densegrpo.run.preemption import Aborted, Preempted
from densegrpo.run.runs import writer_lock
from densegrpo.run.train import run_training
from typer.testing import CliRunner

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from test_loop import ANALYTIC  # noqa: E402

QUIET = ["advantage.name=sparse", "calibrator.name=uniform", "logging.eval_prompts=0", "logging.sample_prompts=0",
         "logging.train_eval_images_per_prompt=0", "checkpoint_every=1"]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}


def quiet_config(*extra: str) -> cfg.RunConfig:
    return cfg.resolve(None, [*ANALYTIC, *QUIET, *extra])


def cli(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "densegrpo", *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    return lines[0]


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    return exit_info.value.code or 0, capsys.readouterr().err


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run of 2 iterations with a checkpoint after each (iter-000001, iter-000002)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    run_training(quiet_config("iterations=2"), run)
    return run


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


# -- 1. corrupt or partial checkpoints --------------------------------------------------------


def test_every_checkpoint_carries_a_manifest_of_sizes_and_sha256(trained):
    folder = ckpt.latest(trained)
    assert folder.name == "iter-000002"
    files = json.loads((folder / ckpt.MANIFEST).read_text())["files"]
    assert set(files) == {"trainable.safetensors", "optimizer.pt", "state.json"}
    for name, entry in files.items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert ckpt.verify(folder) is True


def _truncate(run: Path) -> tuple[str, str]:
    path = run / "checkpoints" / "iter-000002" / "trainable.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    return "iter-000002", "trainable.safetensors has 100 bytes where"


def _remove_optimizer(run: Path) -> tuple[str, str]:
    (run / "checkpoints" / "iter-000002" / "optimizer.pt").unlink()
    return "iter-000002", "optimizer.pt is missing"


def _edit_state(run: Path) -> tuple[str, str]:
    path = run / "checkpoints" / "iter-000002" / "state.json"
    state = json.loads(path.read_text())
    state["iteration"] = 1  # still valid JSON of the same kind: only the checksum can tell
    path.write_text(json.dumps(state, indent=2))
    return "iter-000002", "state.json does not match the sha256"


def _dangling_latest(run: Path) -> tuple[str, str]:
    (run / "checkpoints" / "latest").write_text("iter-000009")
    return "checkpoints/latest", "it names 'iter-000009', which is not a checkpoint folder"


def _missing_latest(run: Path) -> tuple[str, str]:
    (run / "checkpoints" / "latest").unlink()
    return "checkpoints/latest", "it is missing, though the folder holds checkpoints"


@pytest.mark.parametrize("damage", [_truncate, _remove_optimizer, _edit_state, _dangling_latest, _missing_latest])
def test_a_damaged_checkpoint_stops_the_resume_with_one_line_and_changes_nothing(run_copy, damage):
    where, problem = damage(run_copy)
    before = snapshot(run_copy)
    resumed = cli("train", "--resume", str(run_copy), "--set", "iterations=4")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 2
    line = one_error_line(err)
    assert f"checkpoint '{run_copy / 'checkpoints'}" in line and where in line and problem in line, line
    assert f"--resume {run_copy} --fallback" in line
    after = snapshot(run_copy)
    after.pop(".lock", None)  # the resuming process held the lock (and wrote its pid) before it stopped
    before.pop(".lock", None)
    assert after == before  # never trained, never rewrote the config, the metrics or a checkpoint


def test_fallback_continues_from_the_newest_intact_checkpoint_exactly(run_copy, tmp_path, capsys):
    _truncate(run_copy)
    run_training(quiet_config("iterations=3"), run_copy, resume=True, fallback=True)
    note = capsys.readouterr().err
    assert "--fallback: skipped damaged" in note and "iter-000002" in note and f"continuing from '{run_copy / 'checkpoints' / 'iter-000001'}'" in note
    rows = [json.loads(line) for line in (run_copy / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1, 2]
    straight = tmp_path / "straight"
    run_training(quiet_config("iterations=3"), straight)
    a = ckpt.load(ckpt.latest(straight)).trainable
    b = ckpt.load(ckpt.latest(run_copy)).trainable
    assert ckpt.latest(run_copy).name == "iter-000003" and all(torch.equal(a[k], b[k]) for k in a)


def test_fallback_with_no_intact_checkpoint_left_is_an_error(run_copy, capsys):
    _truncate(run_copy)
    (run_copy / "checkpoints" / "iter-000001" / "state.json").write_text("{}")
    with pytest.raises(UserError, match="no intact checkpoint in .* to fall back to .*iter-000002.*iter-000001"):
        run_training(quiet_config("iterations=3"), run_copy, resume=True, fallback=True)
    code, err = run_cli(capsys, "train", "--fallback", "--set", "iterations=1")
    assert code == 2 and "--fallback only goes with --resume" in one_error_line(err)


def test_a_checkpoint_without_a_manifest_loads_unverified_with_one_note(run_copy, capsys):
    folder = ckpt.latest(run_copy)
    (folder / ckpt.MANIFEST).unlink()  # as written before manifests existed
    assert ckpt.verify(folder) is False
    ckpt.load(folder)
    run_training(quiet_config("iterations=3"), run_copy, resume=True)
    notes = [line for line in capsys.readouterr().err.splitlines() if "unverified" in line]
    assert notes == [f"note: checkpoint '{folder}' has no manifest.json (written before checksums); loading it unverified"]
    assert ckpt.latest(run_copy).name == "iter-000003" and ckpt.verify(ckpt.latest(run_copy))


# -- 2. one writer per run folder -------------------------------------------------------------


def test_a_held_lock_refuses_a_second_writer_before_it_writes(tmp_path):
    run = tmp_path / "run"
    with writer_lock(run):
        with pytest.raises(UserError, match=f"'{run}' is in use: another process \\(pid {os.getpid()}\\)"):
            run_training(quiet_config("iterations=1"), run)
        assert not (run / "config.yaml").exists()
    run_training(quiet_config("iterations=1"), run)  # released: the folder is free again


def test_a_second_process_training_into_a_folder_in_use_exits_2_and_the_first_runs_on(tmp_path):
    run = tmp_path / "run"
    sets = [a for item in [*ANALYTIC, *QUIET, "iterations=100000", "checkpoint_every=0"] for a in ("--set", item)]
    first = cli("train", *sets, "--out", str(run))
    metrics = run / "metrics.jsonl"
    try:
        deadline = time.time() + 300
        while time.time() < deadline and first.poll() is None and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.05)
        assert first.poll() is None, first.communicate()[1]
        config = (run / "config.yaml").read_bytes()
        for args in (["--resume", str(run)], [*sets, "--out", str(run)]):
            second = cli("train", *args)
            _, err = second.communicate(timeout=300)
            assert second.returncode == 2
            assert f"'{run}' is in use: another process (pid {first.pid})" in one_error_line(err)
        seen = metrics.read_text().count("\n")
        deadline = time.time() + 60
        while time.time() < deadline and metrics.read_text().count("\n") <= seen:
            time.sleep(0.05)
        assert first.poll() is None and metrics.read_text().count("\n") > seen  # still training, into the same files
        assert (run / "config.yaml").read_bytes() == config
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with writer_lock(run):  # a SIGKILLed writer leaves no stale lock behind
        pass


# -- 3. disk full while checkpointing ---------------------------------------------------------


def _full_disk() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _fail_weights(monkeypatch):
    from safetensors import SafetensorError

    def save_file(tensors, path):
        Path(path).write_bytes(b"\0" * 10)  # a partial file, and the error safetensors raises on a full disk
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt, "save_file", save_file)


class _FillingFile:
    """A file on a disk that fills up after ``room`` bytes."""

    def __init__(self, stream, room: int = 64):
        self.stream, self.room = stream, room

    def write(self, data):
        if len(data) > self.room:
            raise _full_disk()
        self.room -= len(data)
        return self.stream.write(data)

    def __getattr__(self, name):
        return getattr(self.stream, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stream.close()


def _fail_optimizer(monkeypatch):
    # the real torch.save, writing through a file that fills: torch turns the OSError into a RuntimeError
    monkeypatch.setattr(ckpt, "open", lambda path, mode="r", **kw: _FillingFile(open(path, mode, **kw)), raising=False)


def _fail_pointer(monkeypatch):
    real = os.replace

    def replace(src, dst):
        if Path(dst).name == ckpt.LATEST:
            raise _full_disk()
        return real(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)


@pytest.mark.parametrize("fault", [_fail_weights, _fail_optimizer, _fail_pointer])
def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_latest(run_copy, monkeypatch, capsys, fault):
    fault(monkeypatch)
    code, err = run_cli(capsys, "train", "--resume", str(run_copy), "--set", "iterations=4")
    monkeypatch.undo()
    line = one_error_line(err)
    assert code == 2
    assert f"could not write checkpoint '{run_copy / 'checkpoints' / 'iter-000003'}': [Errno 28] No space left on device" in line
    assert "'iter-000002' is still the latest checkpoint" in line
    folder = ckpt.latest(run_copy)
    assert folder.name == "iter-000002" and ckpt.verify(folder) and ckpt.load(folder).state["iteration"] == 2
    left = sorted(p.name for p in (run_copy / "checkpoints").iterdir())
    # nothing partial: the staging folder and the pointer's temporary file are gone; a folder
    # renamed into place before the pointer failed is complete
    assert left in (["iter-000001", "iter-000002", "latest"], ["iter-000001", "iter-000002", "iter-000003", "latest"])
    if "iter-000003" in left:
        assert fault is _fail_pointer and ckpt.verify(run_copy / "checkpoints" / "iter-000003")


# -- 4. failing rewards -----------------------------------------------------------------------


def faulty(fault: str, at_call: int = 1) -> WeightedReward:
    from loop_components import FaultyReward

    return WeightedReward("faulty-brightness", 1.0, FaultyReward(FaultyReward.Config(fault=fault, at_call=at_call)))


def score(reward: WeightedReward, count: int = 4) -> torch.Tensor:
    scorer = RewardScorer([reward], ["a prompt"] * count, [None] * count)
    return scorer(torch.rand(count, 3, 8, 8), torch.arange(count))


@pytest.mark.parametrize("fault, said", [
    ("shape", "returned shape (4, 2) for 4 images; a reward returns one float per image, a (4,) tensor"),
    ("dtype", "returned dtype torch.int64;"),
    ("device", "returned a tensor on meta; return it on the images' device (cpu) or the CPU"),
    ("inf", "returned inf for 1 of 4 images (first: image 1); return a finite score, or NaN for 'not applicable'"),
])
def test_a_reward_returning_the_wrong_thing_is_named_with_what_it_returned(fault, said):
    with pytest.raises(UserError) as error:
        score(faulty(fault))
    assert str(error.value).startswith("reward 'faulty-brightness' ") and said in str(error.value), str(error.value)


def test_a_reward_that_raises_is_named_with_its_one_line_message_and_the_cause_kept():
    with pytest.raises(UserError) as error:
        score(faulty("raise"))
    assert str(error.value) == "reward 'faulty-brightness' raised RuntimeError: scoring server unreachable: connection refused"
    assert isinstance(error.value.__cause__, RuntimeError)


def test_nan_stays_allowed_as_not_applicable():
    scores = score(faulty("nan"))
    assert scores.shape == (4, 1) and torch.isnan(scores[1::2]).all() and torch.isfinite(scores[::2]).all()


def test_a_reward_failing_at_iteration_3_stops_the_run_and_leaves_iteration_2_latest(tmp_path):
    run = tmp_path / "run"
    sets = [a for item in [*ANALYTIC, *QUIET, "iterations=5", "rewards.0.name=loop_components:FaultyReward",
                           "rewards.0.config.at_call=3"] for a in ("--set", item)]
    failing = cli("train", *sets, "--out", str(run))
    _, err = failing.communicate(timeout=300)
    assert failing.returncode == 2
    assert one_error_line(err) == ("error: reward 'loop_components:FaultyReward' raised RuntimeError: "
                                   "scoring server unreachable: connection refused")
    folder = ckpt.latest(run)
    assert folder.name == "iter-000002" and ckpt.verify(folder) and ckpt.load(folder).state["iteration"] == 2
    assert [json.loads(line)["iteration"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1]


# -- 5. preemption: SIGTERM and SIGINT --------------------------------------------------------

# 20 iterations of ~0.1 s (the pause hook changes nothing the run computes), checkpoints only at
# the end: a stop's checkpoint is the one the stop itself writes.
PREEMPTIBLE = [*ANALYTIC, *QUIET, "checkpoint_every=0", "iterations=20", "hooks=[{name: loop_components:PauseHook}]"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The uninterrupted run of PREEMPTIBLE."""
    run = tmp_path_factory.mktemp("straight") / "run"
    run_training(cfg.resolve(None, PREEMPTIBLE), run)
    return run


def metrics_iterations(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line)["iteration"] for line in lines if line.endswith("}")]


@pytest.mark.parametrize("signal_number", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_iteration_checkpoints_and_the_resume_is_bit_identical(tmp_path, straight, signal_number):
    run = tmp_path / "run"
    training = cli("train", *[a for item in PREEMPTIBLE for a in ("--set", item)], "--out", str(run))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and training.poll() is None and not any(i >= 1 for i in metrics_iterations(run)):
            time.sleep(0.02)
        assert training.poll() is None, training.communicate()[1]
        os.kill(training.pid, signal_number)
        out, err = training.communicate(timeout=120)
    finally:
        if training.poll() is None:
            training.kill()
    name = signal.Signals(signal_number).name
    assert training.returncode == {signal.SIGTERM: 143, signal.SIGINT: 130}[signal_number], err
    lines = [line for line in (out + err).splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, out + err
    done = int(re.fullmatch(rf"densegrpo: stopped by {name} after (\d+) of 20 iterations; .*", lines[0]).group(1))
    folder = run / "checkpoints" / f"iter-{done:06d}"
    assert lines[0] == (f"densegrpo: stopped by {name} after {done} of 20 iterations; checkpoint written to '{folder}'; "
                        f"resume with `densegrpo train --resume {run}`")
    assert 2 <= done < 20  # iteration 1 was logged before the signal; the one under way was finished
    assert ckpt.latest(run) == folder and ckpt.verify(folder) and ckpt.load(folder).state["iteration"] == done
    assert metrics_iterations(run) == list(range(done))
    assert json.loads((run / "summary.json").read_text())["stopped_by"] == name

    resumed = CliRunner().invoke(app, ["train", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    final = "checkpoints/iter-000020/trainable.safetensors"
    assert (run / final).read_bytes() == (straight / final).read_bytes()  # bit for bit
    assert metrics_iterations(run) == list(range(20))
    rewards = [[json.loads(line)["reward_mean"] for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (run, straight)]
    assert rewards[0] == rewards[1]


class SignalSelf:
    """A user hook that sends this process SIGTERM ``times`` times at iteration ``at`` (or before
    the first iteration with ``at=-1``)."""

    def __init__(self, at: int, times: int = 1):
        self.at, self.times = at, times

    def send(self):
        for _ in range(self.times):
            os.kill(os.getpid(), signal.SIGTERM)

    def before_training(self, run):
        if self.at == -1:
            self.send()

    def after_iteration(self, run, record):
        if record["iteration"] == self.at:
            self.send()


def handlers() -> dict[int, object]:
    return {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}


@pytest.mark.parametrize("at, said", [
    (1, "after 2 of 5 iterations; its checkpoint '{run}/checkpoints/iter-000002' was already written; "),
    (-1, "before the first iteration; nothing to checkpoint; "),
])
def test_a_stop_says_which_checkpoint_holds_the_run_and_restores_the_signal_handlers(tmp_path, at, said):
    run, before = tmp_path / "run", handlers()
    with pytest.raises(Preempted) as stop:
        run_training(quiet_config("iterations=5"), run, hooks=[SignalSelf(at)])
    assert handlers() == before
    assert str(stop.value) == (f"densegrpo: stopped by SIGTERM {said.format(run=run)}"
                               f"resume with `densegrpo train --resume {run}`" + (" to start it" if at == -1 else ""))
    assert stop.value.exit_status == 143 and stop.value.summary["stopped_by"] == "SIGTERM"
    assert metrics_iterations(run) == list(range(at + 1))
    run_training(quiet_config("iterations=5"), run, resume=True)  # a run stopped before its first checkpoint starts over
    assert metrics_iterations(run) == list(range(5))


def test_a_second_signal_while_stopping_aborts_at_once_without_a_new_checkpoint(tmp_path):
    run, before = tmp_path / "run", handlers()
    with pytest.raises(Aborted) as stop:
        run_training(quiet_config("iterations=5"), run, hooks=[SignalSelf(1, times=2)])
    assert handlers() == before
    assert str(stop.value) == ("densegrpo: second SIGTERM while stopping; stopped at once without a new checkpoint; "
                               f"resume with `densegrpo train --resume {run}` (from its latest checkpoint)")
    assert stop.value.exit_status == 143
    # aborted inside iteration 1's hooks, before its checkpoint: iteration 0's stays latest
    assert ckpt.latest(run).name == "iter-000001" and ckpt.verify(ckpt.latest(run))


# -- 6. exact resume of the default run -------------------------------------------------------

# The default configuration (toy-latent policy, toy-geneval, DenseGRPO), shrunk in size only. Its
# policy has a text encoder behind a prompt cache, which the analytic runs above do not.
DEFAULT_SMALL = ["train.groups_per_iteration=8", "checkpoint_every=1", "logging.sample_every=1", "logging.sample_prompts=0",
                 "logging.eval_prompts=4",
                 "logging.eval_images_per_prompt=2", "logging.train_eval_images_per_prompt=0"]



def test_a_cached_prompt_encoding_does_not_depend_on_the_prompts_encoded_beside_it():
    """A batched encoder rounds differently in different batches; here, exaggerated, each row
    carries its batch size. The cache must give "b" the same encoding whether "b" was new
    alone (a resumed run) or together with "a" (the run that saw "a" first)."""
    from densegrpo.components.policies.adapter import PromptCache
    from densegrpo.contracts.protocols import Cond

    def encode(prompts: list[str]) -> Cond:
        rows = torch.tensor([[float(len(p)), float(len(prompts))] for p in prompts])
        return Cond(prompt_embeds=rows.unsqueeze(1), prompts=list(prompts))

    together, alone = PromptCache(encode), PromptCache(encode)
    together(["a", "b"])
    alone(["b"])
    assert torch.equal(together(["b"]).prompt_embeds, alone(["b"]).prompt_embeds)


def test_the_default_run_resumed_after_iteration_2_ends_bit_identical_to_the_straight_one(tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_training(cfg.resolve(None, [*DEFAULT_SMALL, "iterations=3"]), straight)
    run_training(cfg.resolve(None, [*DEFAULT_SMALL, "iterations=2"]), resumed)
    run_training(cfg.resolve(None, [*DEFAULT_SMALL, "iterations=3"]), resumed, resume=True)
    final = "checkpoints/iter-000003/trainable.safetensors"
    assert (resumed / final).read_bytes() == (straight / final).read_bytes()  # bit for bit
    timing = re.compile(r".*(_s|_per_s)$")
    rows = [[{k: v for k, v in json.loads(line).items() if not timing.fullmatch(k)}
             for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (resumed, straight)]
    assert rows[0] == rows[1]
