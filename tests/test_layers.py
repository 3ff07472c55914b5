"""The package's layers (pyproject's ``[tool.importlinter]``), and the one public module for plugins.

``lint-imports`` checks the contract: the face (cli, bench) over the run over the method over the
contracts; components import only the contracts; worlds import neither the method, the run nor the
face; nothing inside the package imports :mod:`densegrpo.api`; no circles between siblings.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = shutil.which("lint-imports") or str(Path(sys.executable).with_name("lint-imports"))


def lint_imports(package_root: Path, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(package_root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(ROOT / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_layer_contract_holds():
    result = lint_imports(ROOT / "toolkit", ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


@pytest.mark.parametrize("importer, imported, contract", [
    ("method/noise.py", "densegrpo.run.train", "The face over the run over the method over the contracts BROKEN"),
    ("components/samplers/ode.py", "densegrpo.method.grpo", "Components import only the contracts BROKEN"),
    ("worlds/toy/scenes.py", "densegrpo.run.evaluate", "Worlds import neither the method, the run nor the face BROKEN"),
    ("run/build.py", "densegrpo.api", "nothing inside the package imports it BROKEN"),
])
def test_a_wrong_way_import_breaks_the_contract(tmp_path, importer, imported, contract):
    """The same check on a copy of the package with one import added the wrong way."""
    package = tmp_path / "toolkit" / "densegrpo"
    shutil.copytree(ROOT / "toolkit" / "densegrpo", package, ignore=shutil.ignore_patterns("__pycache__", "weights", "data"))
    with open(package / importer, "a") as file:
        file.write(f"\nimport {imported}  # the wrong way\n")
    result = lint_imports(tmp_path / "toolkit", tmp_path)
    assert result.returncode != 0
    assert contract in result.stdout, result.stdout


def densegrpo_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of a ``densegrpo`` module in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] if node.module != "densegrpo" else [f"densegrpo.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, name) for name in names if name == "densegrpo" or name.startswith("densegrpo.")]
    return found


def plugin_sources() -> list[Path]:
    """The code of every plugin package and example (what a third party would write)."""
    sources = [*ROOT.glob("plugins/*/src/**/*.py"), *ROOT.glob("examples/*/src/**/*.py"), *ROOT.glob("examples/*.py")]
    assert len(sources) > 20
    return sorted(sources)


def test_plugins_and_examples_import_only_the_public_module():
    wrong = [f"{path.relative_to(ROOT)}:{line} imports {module}"
             for path in plugin_sources() for line, module in densegrpo_imports(path)
             if module not in ("densegrpo.api",)]
    assert not wrong, "plugins and examples import from densegrpo.api only:\n" + "\n".join(wrong)


def test_the_public_module_exports_what_it_lists():
    import densegrpo.api as api

    missing = [name for name in api.__all__ if not hasattr(api, name)]
    assert not missing
    assert {"Cond", "RewardBatch", "UserError", "load_pretrained", "conform", "load"} <= set(api.__all__)
