"""The SD3.5-M recipes (configs/recipes/, issue 19 item 4): every one loads and validates, its
components' options included, and carries Flow-GRPO's / DenseGRPO's published values, each with a
comment naming its source."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
from densegrpo.contracts import registry
from densegrpo.contracts.config import resolve, validate_components

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs" / "recipes").glob("*-sd35m-*.yaml"))  # other models' recipes have their own tests
PLUGIN_SOURCES = sorted(str(path) for path in (ROOT / "plugins").glob("*/src"))

# Flow-GRPO's config/grpo.py (yifan123/flow_grpo): beta per task (L52, L91, L128), the whole test set
# evaluated every 60 epochs (L45, L85, L122 comments)
BETA = {"geneval": 0.04, "ocr": 0.04, "pickscore": 0.01}
TEST_SET = {"geneval": 2212, "ocr": 1018, "pickscore": 2048}
SOURCE = re.compile(r"L\d+|method\.md|toolkit choice|scheduler_config|train_sd3\.py")


@pytest.fixture(autouse=True)
def _plugins_importable(monkeypatch):
    """The reward plugins from this checkout, so their Configs validate without an install."""
    for path in PLUGIN_SOURCES:
        monkeypatch.syspath_prepend(path)
    registry.refresh()
    yield
    registry.refresh()


def test_there_are_six_recipes():
    assert [p.name for p in RECIPES] == [f"{m}-sd35m-{t}.yaml" for m in ("densegrpo", "flow-grpo") for t in ("geneval", "ocr", "pickscore")]


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_loads_and_every_component_validates(path):
    config = resolve(path)
    validate_components(config)  # the policy, sampler, rewards, estimator and calibrator options


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_recipe_has_the_published_values(path):
    method, task = path.stem.split("-sd35m-")
    config = resolve(path)
    train, sampling, logging = config.train, config.sampling, config.logging
    batch = train.group_size * train.groups_per_iteration
    assert (train.group_size, train.groups_per_iteration, batch) == (24, 48, 1152)
    # two optimizer steps per iteration (Flow-GRPO: gradient_accumulation_steps = num_batches_per_epoch // 2)
    assert train.inner_epochs * math.ceil(batch / train.minibatch_size) == 2 and batch % train.minibatch_size == 0
    assert (train.learning_rate, train.weight_decay, tuple(train.adam_betas), train.grad_clip) == (3e-4, 1e-4, (0.9, 0.999), 1.0)
    assert (train.clip_range, train.advantage_clip, train.timestep_fraction, train.beta) == (1e-4, 5.0, 0.99, BETA[task])
    assert (train.kl, train.cfg_grad, train.drop_zero_advantage, train.same_noise_per_group) == ("flow-grpo", "conditional", True, False)
    assert (train.ratio_norm, train.step_weighting) == (False, "none")
    assert (sampling.num_steps, sampling.eval_steps, sampling.shift) == (10, 40, 3.0)
    assert (config.seed, config.checkpoint_every, logging.sample_every) == (42, 60, 60)
    assert (logging.eval_prompts, logging.eval_images_per_prompt, logging.train_eval_images_per_prompt) == (TEST_SET[task], 1, 0)
    policy = config.policy.config
    assert (policy["resolution"], policy["guidance_scale"], policy["cfg_during_training"], policy["max_sequence_length"]) == (512, 4.5, True, 128)
    assert policy["lora"] == {"enabled": True, "rank": 32, "alpha": 64, "init": "gaussian"}
    assert config.sampler.name == "flow-sde"
    if method == "flow-grpo":
        assert (config.advantage.name, config.advantage.config) == ("sparse", {"std": "batch"})
        assert (config.calibrator.name, config.calibrator.config) == ("uniform", {"noise_level": 0.7})
        assert not config.calibration.before_training
    else:
        assert (config.advantage.name, config.advantage.config) == ("dense", {"completion": "t"})
        assert (config.calibrator.name, config.calibrator.config) == ("reward-aware", {"initial": 0.7, "eps1": 2.0, "eps2": 0.01})
        assert config.calibration.before_training and config.calibration.online_every == 0


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_training_and_sampling_value_names_its_source(path):
    section, missing = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if not line.startswith(" "):
            section = line.split(":")[0]
            if section not in ("seed", "iterations", "checkpoint_every"):
                continue
        elif section not in ("train", "sampling", "logging"):
            continue
        value, _, comment = line.partition("#")
        if not SOURCE.search(comment):
            missing.append(value.strip())
    assert missing == [], f"{path.name}: values without a source comment: {missing}"
