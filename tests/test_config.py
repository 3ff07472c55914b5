"""Run configuration: defaults, YAML/TOML loading, --set overrides and clear errors."""

from __future__ import annotations

import pytest
from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import ConfigError


def test_defaults_describe_the_toy_dense_run():
    run = cfg.default_config()
    assert run.policy.name == "toy-latent" and run.policy.config == {}
    assert run.prompts.train == "toy-train" and run.prompts.test == "toy-test"
    assert run.advantage.name == "dense"
    assert run.calibrator.name == "reward-aware"
    assert [r.name for r in run.rewards] == ["toy-geneval"]
    assert run.sampling.num_steps == 10 and run.sampling.eval_steps == 40 and run.sampling.shift == 3.0


def _all_fields(model):
    for name, field in type(model).model_fields.items():
        yield type(model).__name__, name, field
        value = getattr(model, name)
        if isinstance(value, cfg.BaseModel):
            yield from _all_fields(value)


def test_every_field_has_a_description():
    missing = [f"{owner}.{name}" for owner, name, field in _all_fields(cfg.default_config()) if not field.description]
    assert missing == []


def test_yaml_and_toml_load_the_same(tmp_path):
    (tmp_path / "a.yaml").write_text("iterations: 3\ntrain:\n  beta: 0.01\nadvantage:\n  name: sparse\n")
    (tmp_path / "a.toml").write_text("iterations = 3\n[train]\nbeta = 0.01\n[advantage]\nname = 'sparse'\n")
    a = cfg.resolve(tmp_path / "a.yaml")
    b = cfg.resolve(tmp_path / "a.toml")
    assert a == b
    assert a.iterations == 3 and a.train.beta == 0.01 and a.advantage.name == "sparse"
    assert a.train.group_size == cfg.TrainConfig().group_size  # untouched defaults survive


def test_set_overrides_nested_values_and_component_options():
    run = cfg.resolve(None, ["iterations=2", "checkpoint_every=1", "train.beta=0", "advantage.config.completion=2", "rewards.0.weight=0.5"])
    assert run.iterations == 2 and run.checkpoint_every == 1 and run.train.beta == 0
    assert run.advantage.config == {"completion": 2}
    assert run.rewards[0].weight == 0.5


def test_switching_component_drops_previous_options(tmp_path):
    (tmp_path / "c.yaml").write_text("calibrator:\n  name: uniform\n  config:\n    noise_level: 0.5\n")
    run = cfg.resolve(tmp_path / "c.yaml")
    assert run.calibrator.name == "uniform" and run.calibrator.config == {"noise_level": 0.5}


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.bta=1", "unknown key 'bta'"),
        ("nonsense=1", "unknown key 'nonsense'"),
        ("train.group_size=abc", "train.group_size"),
        ("train.group_size=1", "train.group_size"),
        ("iterations", "must look like key.path=value"),
    ],
)
def test_bad_overrides_name_the_problem(override, fragment):
    with pytest.raises(ConfigError) as error:
        cfg.resolve(None, [override])
    assert fragment in str(error.value)


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.resolve(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("train: [1\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        cfg.resolve(tmp_path / "bad.yaml")
    (tmp_path / "bad.toml").write_text("train = [\n")
    with pytest.raises(ConfigError, match="malformed TOML"):
        cfg.resolve(tmp_path / "bad.toml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        cfg.resolve(tmp_path / "list.yaml")
    (tmp_path / "range.yaml").write_text("train:\n  beta: -1\n")
    with pytest.raises(ConfigError, match="train.beta"):
        cfg.resolve(tmp_path / "range.yaml")


def test_set_switching_component_name_drops_previous_options():
    run = cfg.resolve(None, ["calibrator.config.max_rounds=3", "calibrator.name=uniform", "advantage.name=dense", "advantage.config.completion=2"])
    assert run.calibrator.name == "uniform" and run.calibrator.config == {}
    assert run.advantage.config == {"completion": 2}


@pytest.mark.parametrize("overrides, fix", [
    (["train.minibatch_size=257"], "set it to at most 256"),
    (["reward_combine=sum-advantages"], "use reward_combine=sum-rewards"),
])
def test_checks_across_sections_fail_up_front_with_the_fix_and_without_echoing_the_config(overrides, fix):
    with pytest.raises(ConfigError) as error:
        cfg.resolve(None, overrides)
    message = str(error.value)
    assert fix in message and "'policy'" not in message and "Value error" not in message


def test_each_default_lives_in_its_model():
    # the run's defaults are its sections' own: what `config show` describes is what a bare model gives
    run = cfg.default_config()
    assert run.logging == cfg.LoggingConfig() and run.prompts == cfg.PromptConfig() and run.train == cfg.TrainConfig()
    assert run.sampling == cfg.SamplingConfig() and run.calibration == cfg.CalibrationConfig()
