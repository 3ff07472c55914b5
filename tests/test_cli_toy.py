"""sample, score, eval and calibrate from the CLI on the shipped toy world (offline)."""

from __future__ import annotations

import json

import pytest
from densegrpo.cli.app import main
from PIL import Image


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def test_sample_writes_a_grid(capsys, tmp_path):
    out = tmp_path / "grid.png"
    code, stdout, err = run_cli(capsys, "sample", "--policy", "toy", "--prompt", "a photo of two red circles", "--prompt", "a photo of a blue square", "-n", "2", "--steps", "4", "--out", str(out))
    assert code == 0, err
    with Image.open(out) as image:
        assert image.width > 64 and image.height > 64


def test_score_renders_and_mismatches(capsys, tmp_path):
    from densegrpo.run.images import to_pil
    from densegrpo.worlds.toy.scenes import render_batch

    metadata = {"tag": "counting", "include": [{"class": "circle", "count": 2, "color": "red"}], "prompt": "a photo of two red circles"}
    wrong = {"tag": "counting", "include": [{"class": "square", "count": 3, "color": "blue"}], "prompt": "a photo of three blue squares"}
    image = render_batch([metadata], seed=0)[0]
    path = tmp_path / "scene.png"
    to_pil(image).save(path)
    code, out, err = run_cli(capsys, "score", str(path), "--reward", "toy-geneval", "--prompt", metadata["prompt"], "--metadata", json.dumps(metadata), "--json")
    assert code == 0, err
    right_score = json.loads(out)[0]["score"]
    code, out, _ = run_cli(capsys, "score", str(path), "--reward", "toy-geneval", "--prompt", wrong["prompt"], "--metadata", json.dumps(wrong), "--json")
    assert right_score == 1.0 and json.loads(out)[0]["score"] < 0.5


def test_eval_reports_overall_and_per_tag(capsys):
    code, out, err = run_cli(capsys, "eval", "--benchmark", "toy-geneval", "--steps", "4", "--per-prompt", "1", "--limit", "12", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert set(report["overall"]) == {"partial", "strict", "correct"}
    assert report["per_tag"] and all(0.0 <= v["partial"] <= 1.0 for v in report["per_tag"].values())


def test_eval_unknown_benchmark_is_a_user_error(capsys):
    code, _, err = run_cli(capsys, "eval", "--benchmark", "nope")
    assert code == 2 and "unknown benchmark" in err


def test_calibrate_writes_psi_json_and_png(capsys, tmp_path):
    code, out, err = run_cli(
        capsys, "calibrate", "--out", str(tmp_path), "--set", "sampling.num_steps=4", "--set", "calibrator.config.max_rounds=2",
        "--set", "calibrator.config.samples_per_round=4", "--set", "logging.progress=false",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "calibration.json").read_text())
    assert len(result["rounds"]) == 2 and len(result["psi"]) == 4
    assert (tmp_path / "calibration.png").exists()
