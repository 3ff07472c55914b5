"""The Qwen-Image recipe (configs/recipes/flow-grpo-qwen-image-pickscore.yaml): it validates, carries
Flow-GRPO's pickscore_qwenimage values (config/grpo.py, scripts/train_qwenimage.py), and every value
names its source."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from densegrpo.contracts import registry
from densegrpo.contracts.config import resolve, validate_components

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "recipes" / "flow-grpo-qwen-image-pickscore.yaml"


@pytest.fixture(autouse=True)
def _pickscore_plugin_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "plugins" / "densegrpo-pickscore" / "src"))
    registry.refresh()
    yield
    registry.refresh()


def test_qwen_image_recipe_validates_and_has_flow_grpos_values():
    config = resolve(RECIPE)
    validate_components(config)
    policy, train, sampling = config.policy.config, config.train, config.sampling
    assert config.policy.name == "qwen-image"
    assert (policy["resolution"], policy["guidance_scale"], policy["negative_prompt"]) == (512, 4.0, " ")
    assert policy["lora"] == {"enabled": True, "rank": 64, "alpha": 128, "init": "gaussian"}
    assert (sampling.num_steps, sampling.eval_steps) == (10, 50)
    assert (config.sampler.name, config.sampler.config) == ("sde-window", {"window_size": 2, "max_window_start": 3, "sde": "flow-sde"})
    assert config.calibrator.config == {"noise_level": 1.2}
    assert (train.group_size, train.learning_rate, train.beta, train.clip_range) == (16, 3e-4, 0.0, 1e-4)
    batch = train.group_size * train.groups_per_iteration
    assert batch == 32 * 4 * 4 and math.ceil(batch / train.minibatch_size) == 2  # 32 GPUs x 4 images x 4 batches, 2 optimizer steps
    assert (config.advantage.name, config.advantage.config) == ("sparse", {"std": "batch"})
    assert [(r.name, r.weight, r.config["divisor"]) for r in config.rewards] == [("pickscore", 1.0, 26.0)]
    # the constant shift stands for Qwen-Image's dynamic one at 512 px: exp(mu), mu linear in the token count
    tokens = (512 // 16) ** 2
    mu = 0.5 + (0.9 - 0.5) * (tokens - 256) / (8192 - 256)
    assert sampling.shift == pytest.approx(math.exp(mu), abs=0.01)


def test_every_qwen_image_recipe_value_names_its_source():
    missing = []
    for line in RECIPE.read_text(encoding="utf-8").splitlines():
        body = line.split("#", 1)[0].rstrip()
        if not body.strip() or body.rstrip().endswith(":") or line.lstrip().startswith("#"):
            continue
        if body.strip().startswith(("name:", "device:", "local_files_only:", "train:", "test:", "- name:")):
            continue
        if "#" not in line:
            missing.append(line.strip())
    assert missing == []
