"""CONTRIBUTING.md's "Add a model" example: the files shown there are examples/densegrpo-tiny-policy's, the
package installs with pip and registers its two policies through the ``densegrpo.policies`` entry points, both
pass the registry-wide contract test, and each trains 2 iterations through ``densegrpo train``."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from densegrpo.contracts import registry

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "examples" / "densegrpo-tiny-policy"
SOURCES = [PACKAGE / "pyproject.toml", *sorted((PACKAGE / "src" / "densegrpo_tiny_policy").glob("[sa]*.py"))]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The example package pip-installed (a wheel built offline, no dependencies) into its own folder.

    It is built from a copy, so the build leaves nothing in the repository.
    """
    source = tmp_path_factory.mktemp("src") / PACKAGE.name
    shutil.copytree(PACKAGE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
         "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target


@pytest.fixture
def plugin(installed, monkeypatch):
    monkeypatch.syspath_prepend(str(installed))
    registry.refresh()
    yield
    monkeypatch.undo()
    for name in [m for m in sys.modules if m.startswith("densegrpo_tiny_policy")]:
        del sys.modules[name]
    registry.refresh()


def test_contributing_shows_the_example_files_verbatim():
    guide = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    assert [p.name for p in SOURCES] == ["pyproject.toml", "adapted.py", "standalone.py"]
    for path in SOURCES:
        assert path.read_text(encoding="utf-8") in guide, f"CONTRIBUTING.md no longer shows {path.relative_to(ROOT)}"


def test_installed_package_registers_both_policies_through_entry_points(plugin):
    for name, target in (("tiny-flow", "densegrpo_tiny_policy.standalone:TinyFlowPolicy"),
                         ("tiny-dit", "densegrpo_tiny_policy.adapted:TinyDiTPolicy")):
        info = registry.info("policies", name)
        assert (info.package, info.version, info.target) == ("densegrpo-tiny-policy", "0.1.0", target)


@pytest.mark.parametrize("name", ["tiny-flow", "tiny-dit"])
def test_both_pass_the_contract_test(plugin, name):
    from test_contract import (
        test_class_has_documented_pydantic_config,
        test_component_has_every_required_member_and_typed_optional_ones,
        test_policy_contract,
    )

    test_component_has_every_required_member_and_typed_optional_ones("policies", name)
    test_class_has_documented_pydantic_config("policies", name)
    test_policy_contract("policies", name)


def train_rows(args: list[str], out: Path) -> list[dict]:
    """``densegrpo train ARGS --out OUT`` in this process -> the rows of ``OUT/metrics.jsonl``."""
    from densegrpo.cli.app import app
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["train", *args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] > 0  # the trained part moved away from the reference
    return rows


def test_the_contributing_train_command_runs(plugin, tmp_path):
    guide = (ROOT / "CONTRIBUTING.md").read_text(encoding="utf-8")
    command = guide.split("densegrpo train --set policy.name=tiny-flow", 1)[1].split("```", 1)[0]
    args = shlex.split("--set policy.name=tiny-flow" + command.replace("\\\n", " "))
    assert args[-2:] == ["--out", "runs/tiny-flow"] and "advantage.name=dense" in args
    rows = train_rows(args[:-2], tmp_path / "run")
    assert rows[0]["nfe_dense"] > 0  # dense: intermediate states completed and scored


@pytest.mark.parametrize("name, advantage", [("tiny-flow", "sparse"), ("tiny-dit", "dense")])
def test_two_iterations_through_densegrpo_train(plugin, tmp_path, name, advantage):
    sets = [f"policy.name={name}", "rewards.0.name=toy-clip", f"advantage.name={advantage}", "iterations=2",
            "sampling.num_steps=3", "sampling.eval_steps=2", "train.group_size=2", "train.groups_per_iteration=2",
            "calibrator.name=uniform", "logging.progress=false", "logging.eval_prompts=2", "logging.sample_prompts=2"]
    train_rows([a for s in sets for a in ("--set", s)], tmp_path / "run")
