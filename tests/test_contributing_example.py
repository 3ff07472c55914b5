"""CONTRIBUTING.md's "try a new estimator" example: the copy there is examples/rank_gain.py, the
estimator follows the protocol, and the bench command it shows runs a user's arm beside the
built-in ones and judges it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def rank_gain(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    import rank_gain

    yield rank_gain
    sys.modules.pop("rank_gain", None)


def test_contributing_shows_the_example_file_verbatim():
    assert (ROOT / "examples" / "rank_gain.py").read_text(encoding="utf-8") in (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")


def test_rank_gain_ranks_each_steps_gain_within_its_group(rank_gain):
    from densegrpo.contracts.protocols import DenseRewards, RewardBatch

    dense = torch.tensor([[0.1, 0.5, 0.6], [0.1, 0.2, 0.9], [0.1, 0.3, 0.2], [0.4, 0.4, 0.4]])  # (N=4, T+1=3), one group
    gains = DenseRewards(dense).gains()
    advantages = rank_gain.RankGainAdvantage()(RewardBatch(terminal=dense[:, -1], dense=dense, num_steps=2, group_size=4))
    assert advantages.shape == (4, 2)
    # the largest gain of each step gets +1, the smallest -1, evenly spaced between
    for step in range(2):
        order = gains[:, step].argsort()
        torch.testing.assert_close(advantages[order, step], torch.tensor([-1.0, -1 / 3, 1 / 3, 1.0]))


def test_the_contributing_bench_command_runs_a_users_arm_and_judges_it(rank_gain, tmp_path):
    from densegrpo.cli.app import app
    from typer.testing import CliRunner

    out = tmp_path / "rank-lab"
    result = CliRunner().invoke(app, ["bench", "sparse-vs-dense", "--world", "lab", "--quick", "--seeds", "2", "--arm", "flow-grpo",
                                      "--arm", "densegrpo", "--arm", "rank=rank_gain:RankGainAdvantage", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]["lab"]) == {"flow-grpo", "densegrpo", "rank"}
    assert results["arms"]["rank"].startswith("rank: rank_gain:RankGainAdvantage + uniform")
    claims = {(c["a"], c["b"]) for c in results["summary"]["lab"]["claims"]}
    assert {("rank", "flow-grpo"), ("rank", "densegrpo"), ("densegrpo", "flow-grpo")} <= claims
    assert "| rank > flow-grpo | rank - flow-grpo |" in (out / "report.md").read_text()
    assert (out / "runs" / "lab" / "rank" / "seed1" / "summary.json").exists()


def test_a_bad_user_arm_is_a_one_line_error(tmp_path):
    from densegrpo.cli.app import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["bench", "sparse-vs-dense", "--world", "lab", "--arm", "mine=no_such_module:Estimator",
                                      "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "arm 'mine'" in result.output and "Traceback" not in result.output
