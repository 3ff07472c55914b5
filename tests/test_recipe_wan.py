"""The Wan2.1 recipe (configs/recipes/flow-grpo-wan21-ocr.yaml): it validates, carries Flow-GRPO's
general_ocr_wan2_1 values (yifan123/flow_grpo config/grpo.py, scripts/train_wan2_1.py), and every
value names its source."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from densegrpo.contracts import registry
from densegrpo.contracts.config import resolve, validate_components

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "flow-grpo-wan21-ocr.yaml"


@pytest.fixture(autouse=True)
def _ocr_plugin_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "plugins" / "densegrpo-ocr" / "src"))
    registry.refresh()
    yield
    registry.refresh()


def test_wan_recipe_validates_and_has_flow_grpos_values():
    config = resolve(RECIPE)
    validate_components(config)
    policy, train, sampling = config.policy.config, config.train, config.sampling
    assert config.policy.name == "wan"
    assert (policy["height"], policy["width"], policy["num_frames"], policy["guidance_scale"]) == (240, 416, 33, 4.5)
    assert policy["lora"] == {"enabled": True, "rank": 32, "alpha": 64, "init": "gaussian"}
    assert (sampling.num_steps, sampling.eval_steps) == (20, 50)
    assert (train.group_size, train.learning_rate, train.beta, train.clip_range, train.timestep_fraction) == (4, 1e-4, 0.004, 1e-3, 0.99)
    batch = train.group_size * train.groups_per_iteration
    assert batch == 8 * 8 * 2 and math.ceil(batch / train.minibatch_size) == 2  # 8 GPUs x 8 videos x 2 batches, 2 optimizer steps
    assert (config.advantage.name, config.advantage.config) == ("sparse", {"std": "group"})
    reward = config.rewards[0]
    assert reward.name == "video-frames" and reward.config["image_reward"]["name"] == "ocr" and reward.config["frames"] == 9


def test_every_wan_recipe_value_names_its_source():
    missing = []
    for line in RECIPE.read_text(encoding="utf-8").splitlines():
        body = line.split("#", 1)[0].rstrip()
        if not body.strip() or body.rstrip().endswith(":") or line.lstrip().startswith("#"):
            continue
        if body.strip() in ("- name: video-frames",) or body.strip().startswith(("name:", "device:", "local_files_only:", "train:", "test:")):
            continue
        if "#" not in line:
            missing.append(line.strip())
    assert missing == []
