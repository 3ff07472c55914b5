"""Per-step diagnostics (the loop's per-step clip fraction and gradient norm, the page drawn at
each evaluation) and ``densegrpo report RUN_DIR``, on one real toy run."""

from __future__ import annotations

import json
import re

import pytest
import torch
from densegrpo.cli.app import app
from densegrpo.cli.report import load_run, summary_table
from densegrpo.contracts import config as cfg
from densegrpo.method.step_grad_norms import StepGradNorms
from densegrpo.run.hooks.diagnostics import DIAGNOSTICS
from densegrpo.run.plots import plot_step_diagnostics, step_windows
from densegrpo.run.train import run_training

RUN = [
    "iterations=2", "checkpoint_every=0", "sampling.num_steps=4", "sampling.eval_steps=4",
    "train.group_size=2", "train.groups_per_iteration=2", "calibrator.name=uniform",
    "logging.progress=false", "logging.sample_prompts=2", "logging.eval_prompts=2",
    "logging.eval_images_per_prompt=2", "logging.train_eval_images_per_prompt=0", "logging.sample_every=1",
    "logging.monitor_rewards=[{name: toy-clip}]",
]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report") / "run"
    run_training(cfg.resolve(None, RUN), folder)
    return folder


def cli(*args):
    from typer.testing import CliRunner

    return CliRunner().invoke(app, list(args), prog_name="densegrpo")


def test_step_grad_norms_are_each_backwards_own_gradient():
    torch.manual_seed(0)
    layer = torch.nn.Linear(3, 2)
    x = torch.randn(5, 3)
    losses = [lambda: layer(x).pow(2).mean(), lambda: (layer(x) * 3).sum()]
    expected = []
    for loss in losses:  # each loss's gradient norm on its own
        grads = torch.autograd.grad(loss(), list(layer.parameters()))
        expected.append(float(torch.sqrt(sum(g.pow(2).sum() for g in grads))))
    with StepGradNorms(layer.parameters()) as meter:
        measured = []
        for loss in losses:  # accumulated into .grad, as the update does over steps
            loss().backward()
            measured.append(meter.take())
    assert measured == pytest.approx(expected, rel=1e-5)
    assert layer.weight.grad is not None
    assert StepGradNorms(layer.parameters(), enabled=False).take() != StepGradNorms(layer.parameters(), enabled=False).take()  # NaN


def test_loop_logs_per_step_clip_fraction_and_gradient_norm(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        # T = 4 steps, timestep_fraction 0.99 trains 3: the last step is None
        assert len(row["clipfrac_per_step"]) == len(row["grad_norm_per_step"]) == len(row["noise_level"]) == 4
        assert row["grad_norm_per_step"][-1] is None and row["clipfrac_per_step"][-1] is None
        assert all(v > 0 for v in row["grad_norm_per_step"][:3])
        assert all(0 <= v <= 1 for v in row["clipfrac_per_step"][:3])


def test_windows_cut_at_each_evaluation():
    rows = [{"iteration": i, **({"eval_reward": 0.0} if i in (1, 3) else {})} for i in range(5)]
    assert [(a, b, len(chunk)) for a, b, chunk in step_windows(rows)] == [(0, 1, 2), (2, 3, 2), (4, 4, 1)]


def test_diagnostics_page_is_drawn_during_the_run_and_by_hand(run_dir, tmp_path):
    assert (run_dir / DIAGNOSTICS).stat().st_size > 10_000
    # a sparse run logs no dense gains: the page still draws, saying so
    rows = [{"iteration": i, "noise_level": [0.7, 0.7], "clipfrac_per_step": [0.1, None], "grad_norm_per_step": [1.0, None]} for i in range(3)]
    assert plot_step_diagnostics(rows, tmp_path / "sparse.png").stat().st_size > 10_000


def test_report_prints_the_table_and_writes_one_page(run_dir, tmp_path):
    out = tmp_path / "page.html"
    result = cli("report", str(run_dir), "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "finished" in result.output and "2 of 2" in result.output and "monitor toy_clip" in result.output
    page = out.read_text()
    images = re.findall(r"<img src='data:image/png;base64,", page)
    # reward curve, per-step diagnostics, first and latest sample grid
    assert len(images) == 4
    assert "Per-step diagnostics" in page and "Samples after 2 iterations" in page and "Samples after 0 iterations" in page
    table = dict(summary_table(load_run(run_dir)))
    assert table["iterations"] == "2 of 2" and "monitor toy_clip, paired gain" in table


def test_report_on_a_run_still_training_leaves_its_folder_alone(run_dir, tmp_path):
    partial = tmp_path / "partial"
    partial.mkdir()
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    (partial / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20])  # a torn last line, no summary yet
    result = cli("report", str(partial))
    assert result.exit_code == 0, result.output
    assert "running, or killed" in result.output
    assert sorted(p.name for p in partial.iterdir()) == ["metrics.jsonl", "report.html"]


def blank_metrics(folder):
    (folder / "blank").mkdir()
    (folder / "blank" / "metrics.jsonl").write_text("")
    return folder / "blank"


def a_file(folder):
    (folder / "file.txt").write_text("x")
    return folder / "file.txt"


def empty_folder(folder):
    (folder / "empty").mkdir()
    return folder / "empty"


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d / "missing", "does not exist"),
        (a_file, "is a file, not a run folder"),
        (empty_folder, "has no metrics.jsonl"),
        (blank_metrics, "holds no iteration yet"),
    ],
)
def test_report_on_no_run_is_one_line(tmp_path, make, message):
    result = cli("report", str(make(tmp_path)))
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0]
