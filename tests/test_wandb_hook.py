"""Weights & Biases logging (logging.wandb): a real run in wandb's offline mode, with the
records it writes read back from the .wandb file, and the one-line error without wandb."""

from __future__ import annotations

import json
import struct
import sys

import pytest
from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError
from densegrpo.run.hooks.weights_and_biases import RUN_ID, flatten_record
from densegrpo.run.train import run_training

TINY = [
    "iterations=2", "checkpoint_every=0", "sampling.num_steps=4", "sampling.eval_steps=4",
    "train.group_size=2", "train.groups_per_iteration=2", "calibrator.name=uniform",
    "logging.progress=false", "logging.sample_prompts=2", "logging.eval_prompts=2",
    "logging.eval_images_per_prompt=2", "logging.train_eval_images_per_prompt=0", "logging.sample_every=1",
    "logging.wandb.enabled=true", "logging.wandb.project=densegrpo-test", "logging.wandb.tags=[toy]",
]


def read_wandb_records(path):
    """The protobuf records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version),
    then LevelDB-log chunks (crc32, length, type) in 32 KiB blocks."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, position, pending = [], 7, b""
    block = 32768
    while position + 7 <= len(data):
        if block - position % block < 7:  # a block's tail too short for a header is padding
            position += block - position % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + 7])
        chunk = data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind == 0 and length == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST / MIDDLE, LAST
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def nested(items):
    """History items (a key, or a nested key path for media) as one dict."""
    out = {}
    for item in items:
        *parents, leaf = list(item.nested_key) or [item.key]
        node = out
        for parent in parents:
            node = node.setdefault(parent, {})
        node[leaf] = json.loads(item.value_json)
    return out


def test_flatten_record_turns_lists_into_per_step_series():
    flat = flatten_record({"iteration": 3, "reward_mean": 0.5, "noise_level": [0.7, 0.6], "dense_gain_mean": [0.1, None, float("nan")],
                           "reward_hacking": ["blue"], "ok": True})
    assert flat == {"reward_mean": 0.5, "noise_level/step_0": 0.7, "noise_level/step_1": 0.6, "dense_gain_mean/step_0": 0.1}


def test_offline_run_writes_config_metrics_grids_and_curves(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_training(cfg.resolve(None, TINY), run_dir)
    wandb.teardown()  # the service writes the .wandb file behind finish(); stopping it flushes the file

    run_id = json.loads((run_dir / RUN_ID).read_text())["id"]
    folders = list((tmp_path / "wb" / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(folders) == 1, "one offline run folder, named by the id the run folder keeps"
    folder = folders[0]
    records = read_wandb_records(folder / f"run-{run_id}.wandb")
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "run" in kinds and "history" in kinds and "summary" in kinds

    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.project == "densegrpo-test" and run.display_name == "run" and list(run.tags) == ["toy"]
    config = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "config" for item in r.config.update}
    config.update({item.key: json.loads(item.value_json) for item in run.config.update})
    assert config["iterations"] == 2 and config["train"]["group_size"] == 2 and config["logging"]["wandb"]["enabled"] is True

    history = [nested(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    steps = [h["_step"] for h in history]
    assert steps[:2] == [0, 1]
    first = history[0]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert first["reward_mean"] == pytest.approx(rows[0]["reward_mean"])
    assert first["noise_level/step_0"] == pytest.approx(rows[0]["noise_level"][0])
    assert first["dense_gain_mean/step_0"] == pytest.approx(rows[0]["dense_gain_mean"][0])
    assert "grad_norm_per_step/step_0" in first and "eval_reward" in first
    assert first["samples"]["_type"] == "images/separated" and first["samples"]["count"] == 2  # before training, and after it 1
    last = history[-1]
    assert {"reward_curve", "step_diagnostics"} <= set(last)

    images = {p.name.split("_")[0] for p in (folder / "files" / "media" / "images").glob("*.png")}
    assert {"samples", "reward", "step"} <= images
    summary = {item.key: json.loads(item.value_json) for r in records if r.WhichOneof("record_type") == "summary" for item in r.summary.update}
    assert summary.get("iterations") == 2 and "reward_last" in summary


def test_missing_wandb_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(UserError, match=r"needs the wandb package: pip install 'densegrpo\[wandb\]'") as error:
        run_training(cfg.resolve(None, [*TINY, "iterations=1"]), tmp_path / "run")
    assert "\n" not in str(error.value)
