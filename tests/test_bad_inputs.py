"""The corpus of bad input (issue 20): every case is answered with exit status 2 and one short
line on stderr, ``error: ...``, that says what to fix, and no traceback. docs/faults.md lists
them all. In process through typer's CliRunner (the app itself turns errors into that line);
two of them again as real processes, end to end."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from densegrpo.cli.app import app
from densegrpo.contracts import config as cfg
from PIL import Image
from typer.testing import CliRunner

TESTS = Path(__file__).parent
# Fast components for the `train` cases: each fails before any weights load.
TRAIN = ["--set", "policy.name=loop_components:AnalyticPolicy", "--set", "rewards.0.name=loop_components:BrightnessReward",
         "--set", "logging.progress=false"]
MAX_LINE = 400  # characters: a did-you-mean with the list of available names fits


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """A folder of bad (and a few good) files, named after what is wrong with them."""
    root = tmp_path_factory.mktemp("inputs")
    texts = {
        "bad.yaml": "train: [1\n",
        "bad.toml": "iterations = [\n",
        "unknown-key.yaml": "iteratons: 3\n",
        "wrong-type.yaml": "iterations: many\n",
        "out-of-range.yaml": "train:\n  group_size: 1\n",
        "unknown-component.yaml": "advantage:\n  name: dens\n",
        "list.yaml": "- iterations: 3\n",
        "section-value.toml": "train = 5\n",
        "config.txt": "iterations: 3\n",
        "empty.jsonl": "",
        "malformed.jsonl": '{"prompt": "a red circle"}\n{"prompt": "a blue\n',
        "no-prompt.jsonl": '{"text": "a red circle", "tag": "colors"}\n',
        "prompt-number.jsonl": '{"prompt": 3}\n',
        "not-an-image.png": "this is text",
        "a-file": "not a folder\n",
    }
    for name, text in texts.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "latin1.yaml").write_bytes("seed: 0 # \xe9t\xe9\n".encode("latin-1"))
    (root / "latin1.txt").write_bytes("un cercle rouge \xe9t\xe9\n".encode("latin-1"))
    (root / "folder.yaml").mkdir()
    Image.new("RGB", (32, 32), "red").save(root / "red.png")
    (root / "truncated.png").write_bytes((root / "red.png").read_bytes()[:60])
    (root / "images").mkdir()
    (root / "empty-folder").mkdir()
    # a run folder with its config and no checkpoint yet, and one with metrics (an earlier run)
    for name in ("no-checkpoint", "earlier-run"):
        (root / name).mkdir()
        (root / name / cfg.RUN_CONFIG).write_text(yaml.safe_dump(cfg.default_config().model_dump(mode="json")), encoding="utf-8")
    (root / "earlier-run" / "metrics.jsonl").write_text('{"iteration": 0}\n', encoding="utf-8")
    return root


def train(*sets: str, out: str) -> list[str]:
    return ["train", *TRAIN, *[a for item in sets for a in ("--set", item)], "--out", out]


CASES = [
    # -- config files
    ("config: missing file", ["config", "validate", "missing.yaml"], "config file 'missing.yaml' does not exist"),
    ("config: a folder", ["config", "validate", "folder.yaml"], "'folder.yaml' is a folder; pass a .yaml or .toml"),
    ("config: a run folder as CONFIG", ["train", "no-checkpoint"], "to continue the run in it, pass --resume no-checkpoint"),
    ("config: bad YAML", ["config", "validate", "bad.yaml"], "malformed YAML in 'bad.yaml' at line 2"),
    ("config: bad TOML", ["config", "validate", "bad.toml"], "malformed TOML in 'bad.toml'"),
    ("config: not UTF-8", ["config", "validate", "latin1.yaml"], "'latin1.yaml' is not UTF-8 text (byte 0xe9"),
    ("config: unknown suffix", ["config", "validate", "config.txt"], "must end in .yaml, .yml, .toml or .json"),
    ("config: a list at the top", ["config", "validate", "list.yaml"], "must hold a mapping at the top level, not list"),
    ("config: unknown key", ["config", "validate", "unknown-key.yaml"], "iteratons: unknown field; remove it or check its spelling"),
    ("config: wrong type", ["config", "validate", "wrong-type.yaml"], "iterations: Input should be a valid integer"),
    ("config: a value for a section", ["config", "validate", "section-value.toml"], "train: Input should be a valid dictionary"),
    ("config: out of range", ["config", "validate", "out-of-range.yaml"], "train.group_size: Input should be greater than or equal to 2 (got 1)"),
    ("config: unknown component", ["config", "validate", "unknown-component.yaml"], "unknown advantage 'dens'; did you mean 'dense'"),
    ("config: fields that disagree", ["config", "show", "--set", "train.minibatch_size=300"], "train.minibatch_size=300 exceeds the batch"),
    ("config: negative seed", ["config", "show", "--set", "seed=-1"], "seed: Input should be greater than or equal to 0"),
    ("config: unknown device", train("device=gpu0", out="run-device"), "device 'gpu0' is not a torch device"),
    ("config: a GPU this machine lacks", train("device=cuda:99", out="run-cuda"), "device 'cuda:99': "),
    # -- --set values
    ("--set: no '='", ["config", "show", "--set", "iterations"], "--set 'iterations' must look like key.path=value"),
    ("--set: no key", ["config", "show", "--set", "=3"], "--set '=3' must look like key.path=value"),
    ("--set: unknown key", ["config", "show", "--set", "train.bta=0.1"], "--set train.bta: unknown key 'bta'; valid keys here: adam_betas"),
    ("--set: bad value", ["config", "show", "--set", "iterations=many"], "iterations: Input should be a valid integer"),
    ("--set: NaN where a positive number goes", ["config", "show", "--set", "train.learning_rate=.nan"], "train.learning_rate: Input should be greater than 0 (got nan)"),
    ("--set: list too short", ["config", "show", "--set", "train.adam_betas=[0.9]"], "train.adam_betas.1: Field required"),
    ("--set: list not closed", ["config", "show", "--set", "train.adam_betas=[0.9,"], "train.adam_betas: Input should be a valid tuple (got '[0.9,')"),
    ("--set: index past the list", ["config", "show", "--set", "rewards.3.name=toy-clip"], "--set rewards.3.name: '3' is not an index of a list of length 1"),
    ("--set: into a value", ["config", "show", "--set", "iterations.max=3"], "--set iterations.max: 'iterations' is a value, not a section"),
    ("--set: a reward option that does not exist", ["score", "red.png", "--reward", "toy-geneval", "-p", "a red circle", "--set", "strictness=1"], "reward 'toy-geneval' config: strictness: unknown field"),
    ("--set: a reward option's bad value", ["score", "red.png", "--reward", "toy-geneval", "-p", "a red circle", "--set", "mode=loose"], "mode: Input should be 'partial', 'strict' or 'correct' (got 'loose')"),
    # -- prompt files
    ("prompts: missing file", train("prompts.train=missing.jsonl", out="run-p1"), "prompt set 'missing.jsonl' is neither a file nor a built-in set"),
    ("prompts: a folder", train("prompts.train=empty-folder", out="run-p2"), "prompt set 'empty-folder' is a folder"),
    ("prompts: empty file", train("prompts.train=empty.jsonl", out="run-p3"), "no training prompts in 'empty.jsonl'"),
    ("prompts: malformed JSONL line", train("prompts.train=malformed.jsonl", out="run-p4"), "malformed.jsonl line 2 is not valid JSON"),
    ("prompts: no 'prompt' field", train("prompts.train=no-prompt.jsonl", out="run-p5"), "no-prompt.jsonl line 1 needs a 'prompt' string"),
    ("prompts: 'prompt' not a string", train("prompts.train=prompt-number.jsonl", out="run-p6"), "prompt-number.jsonl line 1 needs a 'prompt' string"),
    ("prompts: not UTF-8", train("prompts.train=latin1.txt", out="run-p7"), "prompt file 'latin1.txt' is not UTF-8 text (byte 0xe9"),
    ("prompts: missing test set", train("prompts.test=missing-test.jsonl", out="run-p8"), "prompt set 'missing-test.jsonl' is neither"),
    # -- images (densegrpo score)
    ("image: missing file", ["score", "missing.png", "--reward", "toy-geneval", "-p", "a red circle"], "image file 'missing.png' does not exist"),
    ("image: not an image", ["score", "not-an-image.png", "--reward", "toy-geneval", "-p", "a red circle"], "'not-an-image.png' is not a readable image (cannot identify"),
    ("image: truncated", ["score", "truncated.png", "--reward", "toy-geneval", "-p", "a red circle"], "'truncated.png' is not a readable image"),
    ("image: a folder", ["score", "images", "--reward", "toy-geneval", "-p", "a red circle"], "'images' is a folder, not an image file; pass the images in it"),
    ("image: prompts and images disagree", ["score", "red.png", "red.png", "red.png", "--reward", "toy-geneval", "-p", "a", "-p", "b"], "one --prompt for all images or one per image (3), not 2"),
    ("image: no --prompt", ["score", "red.png", "--reward", "toy-geneval"], "no --prompt given; pass one --prompt for all images or one per image (1)"),
    ("image: --metadata not JSON", ["score", "red.png", "--reward", "toy-geneval", "-p", "a red circle", "--metadata", "{tag: colors"], "--metadata is not valid JSON"),
    ("image: --metadata count", ["score", "red.png", "--reward", "toy-geneval", "-p", "a red circle", "--metadata", "[{}, {}]"], "--metadata must be one JSON object or a list of 1 objects"),
    ("image: --metadata file missing", ["score", "red.png", "--reward", "toy-geneval", "-p", "a red circle", "--metadata", "meta.jsonl"], "--metadata file 'meta.jsonl' does not exist"),
    ("image: --out a folder", ["sample", "--prompt", "a red circle", "--out", "images"], "--out 'images' is a folder; pass a file name such as images/grid.png"),
    ("image: --out under a file", ["sample", "--prompt", "a red circle", "--out", "a-file/grid.png"], "'a-file' is a file, not a folder"),
    # -- plugin names
    ("plugin: unknown reward", ["score", "red.png", "--reward", "toy-genevl", "-p", "a red circle"], "unknown reward 'toy-genevl'; did you mean 'toy-geneval'"),
    ("plugin: unknown sampler", train("sampler.name=flow-sd", out="run-n1"), "unknown sampler 'flow-sd'; did you mean 'flow-sde'?"),
    ("plugin: unknown policy", ["sample", "--policy", "sd35", "--prompt", "a red circle"], "unknown policy 'sd35'"),
    ("plugin: unknown advantage", train("advantage.name=dens", out="run-n2"), "unknown advantage 'dens'; did you mean 'dense'"),
    ("plugin: unknown calibrator", train("calibrator.name=unifrm", out="run-n3"), "unknown calibrator 'unifrm'; did you mean 'uniform'?"),
    ("plugin: unknown hook", train("hooks=[{name: tensorbord}]", out="run-n4"), "unknown hook 'tensorbord'"),
    ("plugin: module:attr that does not import", train("rewards.0.name=no_such_module:Reward", out="run-n5"), "reward 'no_such_module:Reward' from package <reference> failed to import (ModuleNotFoundError"),
    ("plugin: module:attr with no such attr", train("rewards.0.name=loop_components:NoSuchReward", out="run-n6"), "points to 'loop_components:NoSuchReward', which does not exist"),
    ("plugin: module:attr that is no component", train("rewards.0.name=os:path", out="run-n7"), "reward 'os:path' (os:path) must be a class with a nested pydantic Config"),
    ("plugin: unknown kind", ["plugins", "--kind", "widgets"], "unknown component kind 'widgets'; use one of: policies"),
    ("plugin: unknown benchmark", ["eval", "--benchmark", "genevl"], "unknown benchmark 'genevl'; available: geneval, toy-clip, toy-geneval"),
    # -- run folders
    ("run folder: --resume of a missing folder", ["train", "--resume", "no-such-run"], "run folder 'no-such-run' does not exist"),
    ("run folder: --resume of a folder with no run", ["train", "--resume", "empty-folder"], "'empty-folder' is not a run folder (no config.yaml)"),
    ("run folder: --resume of a file", ["train", "--resume", "a-file"], "'a-file' is a file, not a run folder"),
    ("run folder: --out is a file", train(out="a-file"), "cannot make run folder 'a-file': it or a folder above it is a file"),
    ("run folder: --out holds a run", train(out="earlier-run"), "'earlier-run' already holds a run; pass --resume earlier-run"),
    ("run folder: eval of a run with no checkpoint", ["eval", "no-checkpoint"], "run folder 'no-checkpoint' has no checkpoint yet"),
    ("run folder: eval of a folder with no run", ["eval", "empty-folder"], "'empty-folder' is not a run folder (no config.yaml)"),
    # -- option combinations and counts
    ("options: --resume and another --out", ["train", "--resume", "no-checkpoint", "--out", "elsewhere"], "pass either --resume RUN_DIR or --out DIR, not both"),
    ("options: --fallback without --resume", ["train", "--fallback"], "--fallback only goes with --resume RUN_DIR"),
    ("options: no prompt to sample", ["sample", "--policy", "toy"], "no prompt given; pass at least one --prompt TEXT"),
    ("options: zero images per prompt", ["sample", "--prompt", "a", "--per-prompt", "0"], "Invalid value for '--per-prompt' / '-n'"),
    ("options: negative images per prompt", ["eval", "--per-prompt", "-2"], "Invalid value for '--per-prompt' / '-n'"),
    ("options: zero --limit", ["eval", "--limit", "0"], "Invalid value for '--limit'"),
    ("options: --steps not a number", ["eval", "--steps", "forty"], "Invalid value for '--steps'"),
    ("options: zero --seeds", ["bench", "sparse-vs-dense", "--seeds", "0"], "Invalid value for '--seeds'"),
    ("options: unknown benchmark arm", ["bench", "sparse-vs-dense", "--quick", "--arm", "dense-n9", "--out", "bench"], "unknown arm 'dense-n9'; available: flow-grpo"),
    ("options: --report-only with no results", ["bench", "sparse-vs-dense", "--report-only", "--out", "empty-folder"], "results.json' does not exist"),
    ("options: calibrating a calibrator without rounds", ["calibrate", *TRAIN, "--set", "calibrator.name=uniform", "--out", "calib"], "calibrator 'uniform' has no calibration rounds"),
    ("options: no --reward", ["score", "red.png"], "Missing option '--reward' / '-r'; see `densegrpo score --help`"),
    ("options: no image", ["score", "--reward", "toy-geneval", "-p", "a red circle"], "Missing argument 'images'; see `densegrpo score --help`"),
    ("options: unknown option", ["train", "--iterations", "3"], "No such option: --iterations"),
    ("options: two configs", ["train", "a.yaml", "b.yaml"], "Got unexpected extra argument(s) (b.yaml)"),
    ("options: unknown command", ["fit"], "No such command 'fit'"),
]


@pytest.fixture
def in_inputs(inputs, monkeypatch) -> Path:
    monkeypatch.chdir(inputs)  # the cases name their files relative to it, as a user would
    monkeypatch.syspath_prepend(str(TESTS))
    return inputs


def one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in stderr, stderr
    assert len(lines[0]) <= MAX_LINE, lines[0]
    return lines[0]


def test_the_corpus_holds_at_least_30_distinct_cases():
    assert len(CASES) >= 30 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("args, said", [pytest.param(args, said, id=name) for name, args, said in CASES])
def test_bad_input_is_answered_with_status_2_and_one_line(in_inputs, args, said):
    out = in_inputs / args[args.index("--out") + 1] if args[0] == "train" and "--out" in args else None
    fresh = out is not None and not out.exists()
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, (result.output, result.exception)
    assert said in one_line(result.stderr)
    assert result.stdout == ""
    if fresh:  # a training run that fails on bad input leaves no run folder behind
        assert not out.exists()


@pytest.mark.parametrize("args, said", [
    (["config", "validate", "latin1.yaml"], "'latin1.yaml' is not UTF-8 text"),
    (train("prompts.train=malformed.jsonl", out="run-process"), "malformed.jsonl line 2 is not valid JSON"),
])
def test_a_real_process_exits_2_with_one_line_and_no_traceback(inputs, args, said):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "densegrpo", *args], cwd=inputs, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert said in one_line(done.stderr)
