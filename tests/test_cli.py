"""The CLI: listing plugins, config commands, and one-line exit-2 errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from densegrpo.cli.app import main


def run_cli(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
        raise SystemExit(0)
    captured = capsys.readouterr()
    return exit_info.value.code or 0, captured.out, captured.err


def assert_user_error(code, err, fragment):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert fragment in lines[0], lines[0]


def test_plugins_json_lists_every_builtin(capsys):
    code, out, _ = run_cli(capsys, "plugins", "--json")
    assert code == 0
    rows = json.loads(out)
    names = {(r["kind"], r["name"]) for r in rows}
    for kind, name in [("policies", "toy"), ("samplers", "flow-sde"), ("rewards", "toy-geneval"), ("advantages", "dense"), ("calibrators", "reward-aware")]:
        assert (kind, name) in names
    assert all(r["package"].startswith(r["package"].split("==")[0] + "==") for r in rows)
    assert all(":" in r["target"] for r in rows)


def test_plugins_kind_filter_and_fake_third_party(capsys, fake_plugin):
    code, out, _ = run_cli(capsys, "plugins", "--kind", "rewards", "--json")
    rows = json.loads(out)
    assert {r["kind"] for r in rows} == {"rewards"}
    fake = [r for r in rows if r["name"] == "fake-brightness"]
    assert fake and fake[0]["package"] == "densegrpo-fake==9.9.9"


def test_third_party_reward_usable_by_name_in_a_config(capsys, fake_plugin, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("rewards:\n  - name: fake-brightness\n    config:\n      scale: 3.0\n")
    code, out, err = run_cli(capsys, "config", "validate", str(path))
    assert code == 0, err
    assert "valid" in out


def test_config_show_json(capsys):
    code, out, _ = run_cli(capsys, "config", "show", "--json", "--set", "iterations=3")
    assert code == 0 and json.loads(out)["iterations"] == 3


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("plugins", "--kind", "widgets"), "unknown component kind"),
        (("config", "validate", "no/such/file.yaml"), "does not exist"),
        (("config", "show", "--set", "train.bta=1"), "unknown key 'bta'"),
        (("config", "show", "--set", "train.beta=-3"), "train.beta"),
        (("train", "--no-such-option"), "No such option"),
        (("score", "missing.png", "--reward", "toy-geneval", "--prompt", "x"), "does not exist"),
    ],
)
def test_bad_input_exits_2_with_one_line(capsys, args, fragment):
    code, _, err = run_cli(capsys, *args)
    assert_user_error(code, err, fragment)


def test_malformed_files_exit_2(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("a: [1\n")
    (tmp_path / "bad.toml").write_text("a = [\n")
    for name in ("bad.yaml", "bad.toml"):
        code, _, err = run_cli(capsys, "config", "validate", str(tmp_path / name))
        assert_user_error(code, err, "malformed")


def test_unknown_plugin_in_config_exits_2(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("advantage:\n  name: dens\n")
    code, _, err = run_cli(capsys, "config", "validate", str(tmp_path / "c.yaml"))
    assert_user_error(code, err, "did you mean 'dense'")


def test_wrong_component_option_names_field(capsys, tmp_path):
    (tmp_path / "c.yaml").write_text("calibrator:\n  name: uniform\n  config:\n    noise_level: loud\n")
    code, _, err = run_cli(capsys, "config", "validate", str(tmp_path / "c.yaml"))
    assert_user_error(code, err, "noise_level")


def test_plugin_import_failure_names_plugin_and_package(capsys, tmp_path, monkeypatch):
    from conftest import make_fake_distribution
    from densegrpo.contracts import registry

    make_fake_distribution(tmp_path, "densegrpo-broken", "densegrpo_broken2", "import no_such_dependency_xyz\n", "[densegrpo.rewards]\nbroken = densegrpo_broken2:R\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    try:
        code, _, err = run_cli(capsys, "score", "x.png", "--reward", "broken", "--prompt", "p")
        # the image check or the import check may come first; both are one-line user errors
        assert code == 2 and len(err.strip().splitlines()) == 1
        (tmp_path / "c.yaml").write_text("rewards:\n  - name: broken\n")
        code, _, err = run_cli(capsys, "config", "validate", str(tmp_path / "c.yaml"))
        assert_user_error(code, err, "densegrpo-broken")
        assert "broken" in err
    finally:
        monkeypatch.undo()
        registry.refresh()


def test_help_on_every_command():
    for args in (["--help"], ["plugins", "--help"], ["train", "--help"], ["calibrate", "--help"], ["sample", "--help"], ["score", "--help"], ["eval", "--help"], ["config", "show", "--help"], ["bench", "sparse-vs-dense", "--help"]):
        result = subprocess.run([sys.executable, "-m", "densegrpo", *args], capture_output=True, text=True)
        assert result.returncode == 0, (args, result.stderr)
        assert "Usage" in result.stdout
