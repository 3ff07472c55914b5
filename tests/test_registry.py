"""Entry-point discovery, lazy loading, did-you-mean errors, duplicates and autoload switch."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_fake_distribution
from densegrpo.contracts import registry
from densegrpo.contracts.errors import (
    ConfigError,
    DuplicateComponentError,
    PluginImportError,
    UnknownComponentError,
)

BUILTINS = {
    "policies": {"toy", "toy-latent", "sd3", "flux", "wan", "qwen-image", "flux2", "z-image"},
    "samplers": {"ode", "flow-sde", "cps", "sde-window", "coarse-sde"},
    "rewards": {"toy-geneval", "toy-clip", "video-frames"},
    "advantages": {"sparse", "dense", "dense-raw", "dense-return"},
    "calibrators": {"uniform", "reward-aware"},
    "hooks": set(),  # the run's own bookkeeping hooks are always on; this group is for added ones
}


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_builtins_are_registered_through_entry_points(kind):
    infos = {c.name: c for c in registry.components(kind)}
    assert BUILTINS[kind] <= set(infos)
    for name in BUILTINS[kind]:
        assert infos[name].package == "densegrpo"
        assert infos[name].target.startswith("densegrpo.")


def test_importing_densegrpo_and_listing_is_lazy():
    code = (
        "import sys; from densegrpo.contracts import registry; "
        "[registry.components(k) for k in ('policies','samplers','rewards','advantages','calibrators')]; "
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip', 'peft') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "", f"listing components imported {out}"


def test_unknown_name_suggests_close_match():
    with pytest.raises(UnknownComponentError) as error:
        registry.load("advantages", "dens")
    message = str(error.value)
    assert "did you mean 'dense'" in message
    assert "available:" in message and "sparse" in message


def test_unknown_kind():
    with pytest.raises(UnknownComponentError):
        registry.available("widgets")


def test_module_attr_reference_loads_without_registration():
    estimator = registry.load("advantages", "densegrpo.components.advantages.sparse:SparseAdvantage")
    assert type(estimator).__name__ == "SparseAdvantage"


def test_config_is_validated_with_field_path():
    with pytest.raises(ConfigError) as error:
        registry.load("calibrators", "uniform", {"noise_level": "loud"})
    assert "noise_level" in str(error.value)
    with pytest.raises(ConfigError) as error:
        registry.load("calibrators", "uniform", {"not_a_field": 1})
    assert "not_a_field" in str(error.value) and "unknown field" in str(error.value)


def test_fake_third_party_distribution_is_discovered_listed_and_loadable(fake_plugin):
    info = registry.info("rewards", "fake-brightness")
    assert info.package == "densegrpo-fake" and info.version == "9.9.9"
    assert "fake-brightness" in registry.available("rewards")
    reward = registry.load("rewards", "fake-brightness", {"scale": 2.0})
    import torch

    images = torch.full((2, 3, 8, 8), 0.25)
    assert torch.allclose(reward(images, ["a", "b"], [None, None]), torch.tensor([0.5, 0.5]))


def test_autoload_switch_hides_third_party(fake_plugin, monkeypatch):
    monkeypatch.setenv("DENSEGRPO_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.refresh()
    assert "fake-brightness" not in registry.available("rewards")
    assert "toy-geneval" in registry.available("rewards")
    monkeypatch.delenv("DENSEGRPO_DISABLE_PLUGIN_AUTOLOAD")
    registry.refresh()
    assert "fake-brightness" in registry.available("rewards")


def test_duplicate_name_from_two_packages_names_both(tmp_path, monkeypatch):
    make_fake_distribution(
        tmp_path,
        "densegrpo-clash",
        "densegrpo_clash",
        "class X:\n    pass\n",
        "[densegrpo.samplers]\node = densegrpo_clash:X\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    try:
        with pytest.raises(DuplicateComponentError) as error:
            registry.available("samplers")
        assert "densegrpo-clash" in str(error.value) and "densegrpo==" in str(error.value)
    finally:
        monkeypatch.undo()
        registry.refresh()


def test_plugin_whose_import_fails_names_plugin_and_package(tmp_path, monkeypatch):
    make_fake_distribution(
        tmp_path,
        "densegrpo-broken",
        "densegrpo_broken",
        "import a_module_that_does_not_exist_anywhere\n",
        "[densegrpo.rewards]\nbroken-reward = densegrpo_broken:Reward\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    try:
        with pytest.raises(PluginImportError) as error:
            registry.load("rewards", "broken-reward")
        assert "broken-reward" in str(error.value) and "densegrpo-broken" in str(error.value)
    finally:
        monkeypatch.undo()
        registry.refresh()


def test_runtime_register_and_unregister():
    registry.register("advantages", "runtime-sparse", "densegrpo.components.advantages.sparse:SparseAdvantage")
    try:
        assert "runtime-sparse" in registry.available("advantages")
        assert type(registry.load("advantages", "runtime-sparse")).__name__ == "SparseAdvantage"
    finally:
        registry.unregister("advantages", "runtime-sparse")
    assert "runtime-sparse" not in registry.available("advantages")
