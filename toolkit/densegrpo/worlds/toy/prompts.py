"""GenEval-format prompts for the toy world, and the prompt loader every command uses.

Each prompt is one JSON object per line, exactly as GenEval's
``prompts/evaluation_metadata.jsonl`` (djghosh13/geneval, ``prompts/create_prompts.py``)::

    {"tag": "counting", "include": [{"class": "circle", "count": 2}],
     "exclude": [{"class": "circle", "count": 3}], "prompt": "a photo of two circles"}

The toy world enumerates every prompt GenEval's six generators can write over
:data:`~densegrpo.worlds.toy.scenes.SHAPES` and :data:`~densegrpo.worlds.toy.scenes.COLORS` (same phrasing,
articles, plurals and counts 2 to 4) and splits them per tag into disjoint train and test
sets with a fixed seed. The shipped files are ``toy/data/train.jsonl`` and
``toy/data/test.jsonl``; regenerate them with ``python -m densegrpo.worlds.toy.prompts``.
"""

from __future__ import annotations

import itertools
import json
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from densegrpo.contracts.errors import UserError
from densegrpo.worlds.geneval_rules import RELATIONS, TAGS
from densegrpo.worlds.toy.scenes import COLORS, SHAPES

NUMBERS = ("zero", "one", "two", "three", "four")
"""Number words, GenEval's ``numbers`` list up to four."""

SPLIT_SEED = 4
"""Seed of the train/test split of the shipped files."""

TEST_SIZES = {
    "single_object": 1,
    "two_object": 2,
    "counting": 3,
    "colors": 7,
    "position": 8,
    "color_attr": 60,
}
"""Test prompts per tag; every other enumerated prompt goes to train."""

FOCUS_SIZE = 8
"""Prompts in ``toy-train-focus``, the main job's training set."""

FOCUS_SEED = 0
"""Seed of the ``toy-train-focus`` draw from the ``color_attr`` training prompts."""

BUILTIN = {
    "toy-train": "train.jsonl",
    "toy-test": "test.jsonl",
    "toy-train-focus": "train_focus.jsonl",
    # the credit-assignment lab (densegrpo.worlds.lab): "pattern k", train k = 0..63, test k = 64..127
    "lab-train": "lab_train.jsonl",
    "lab-test": "lab_test.jsonl",
}
"""Names :func:`load_prompts` resolves to the shipped files."""


def with_article(name: str) -> str:
    """``"a circle"``, ``"an orange square"`` (GenEval's ``with_article``)."""
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def make_plural(name: str) -> str:
    """``"circles"``, ``"glasses"`` (GenEval's ``make_plural``)."""
    return f"{name}es" if name[-1] == "s" else f"{name}s"


def single_object(shape: str) -> dict[str, Any]:
    return {"tag": "single_object", "include": [{"class": shape, "count": 1}], "prompt": f"a photo of {with_article(shape)}"}


def two_object(a: str, b: str) -> dict[str, Any]:
    return {
        "tag": "two_object",
        "include": [{"class": a, "count": 1}, {"class": b, "count": 1}],
        "prompt": f"a photo of {with_article(a)} and {with_article(b)}",
    }


def counting(shape: str, number: int) -> dict[str, Any]:
    return {
        "tag": "counting",
        "include": [{"class": shape, "count": number}],
        "exclude": [{"class": shape, "count": number + 1}],
        "prompt": f"a photo of {NUMBERS[number]} {make_plural(shape)}",
    }


def colors(shape: str, color: str) -> dict[str, Any]:
    return {
        "tag": "colors",
        "include": [{"class": shape, "count": 1, "color": color}],
        "prompt": f"a photo of {with_article(color)} {shape}",
    }


def position(a: str, relation: str, b: str) -> dict[str, Any]:
    """``a`` stands in ``relation`` to ``b``; ``b`` is clause 0, as in GenEval."""
    return {
        "tag": "position",
        "include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}],
        "prompt": f"a photo of {with_article(a)} {relation} {with_article(b)}",
    }


def color_attr(a: str, color_a: str, b: str, color_b: str) -> dict[str, Any]:
    return {
        "tag": "color_attr",
        "include": [{"class": a, "count": 1, "color": color_a}, {"class": b, "count": 1, "color": color_b}],
        "prompt": f"a photo of {with_article(color_a)} {a} and {with_article(color_b)} {b}",
    }


def enumerate_prompts() -> dict[str, list[dict[str, Any]]]:
    """Every toy prompt GenEval's generators can write, by tag (distinct shapes and colours
    within a prompt, counts 2 to 4, as in ``create_prompts.py``)."""
    pairs = list(itertools.permutations(SHAPES, 2))
    return {
        "single_object": [single_object(s) for s in SHAPES],
        "two_object": [two_object(a, b) for a, b in pairs],
        "counting": [counting(s, n) for s in SHAPES for n in (2, 3, 4)],
        "colors": [colors(s, c) for s in SHAPES for c in COLORS],
        "position": [position(a, r, b) for a, b in pairs for r in RELATIONS],
        "color_attr": [
            color_attr(a, ca, b, cb) for a, b in pairs for ca, cb in itertools.permutations(COLORS, 2)
        ],
    }


def split_prompts(seed: int = SPLIT_SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Disjoint (train, test) lists: :data:`TEST_SIZES` test prompts per tag, chosen by ``seed``."""
    rng = np.random.default_rng(seed)
    train: list[dict[str, Any]] = []
    test: list[dict[str, Any]] = []
    for tag in TAGS:
        items = enumerate_prompts()[tag]
        order = rng.permutation(len(items))
        held = set(order[: TEST_SIZES[tag]].tolist())
        test.extend(items[i] for i in sorted(held))
        train.extend(items[i] for i in range(len(items)) if i not in held)
    return train, test


def focus_prompts(train: list[dict[str, Any]], size: int = FOCUS_SIZE, seed: int = FOCUS_SEED) -> list[dict[str, Any]]:
    """``size`` ``color_attr`` prompts of ``train``, drawn by ``seed``: the main job's training set.

    A CPU run of the toy buys about 4 000 samples. Spread over the 234 training prompts that is
    16 per prompt, too few to move any one of them; on 8 prompts it is about 480 each. The
    held-out ``toy-test`` set (60 of its 81 prompts are ``color_attr``) then measures how much
    of that carries over to prompts never trained on.
    """
    pool = [r for r in train if r["tag"] == "color_attr"]
    order = np.random.default_rng(seed).permutation(len(pool))[:size]
    return [pool[i] for i in sorted(order.tolist())]


def _read_jsonl(text: str, source: str) -> list[dict[str, Any]]:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UserError(f"{source} line {number} is not valid JSON ({error.msg} column {error.colno}); fix that line") from None
        if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
            raise UserError(f"{source} line {number} needs a 'prompt' string, as in GenEval's metadata format")
        rows.append(row)
    return rows


def load_prompts(name_or_path: str | Path) -> list[dict[str, Any]]:
    """Load prompts as a list of dicts, each with at least ``"prompt"``.

    Args:
        name_or_path: ``"toy-train"``, ``"toy-test"`` or ``"toy-train-focus"`` (the shipped
            GenEval-format sets), ``"lab-train"`` or ``"lab-test"`` (the lab's patterns), a
            ``.jsonl`` file in GenEval's metadata format, or a plain text file with one prompt
            per line (each becomes ``{"prompt": line}``, with no metadata).
    """
    name = str(name_or_path)
    if name in BUILTIN:
        text = resources.files("densegrpo.worlds.toy").joinpath("data", BUILTIN[name]).read_text(encoding="utf-8")
        return _read_jsonl(text, name)
    path = Path(name)
    if path.is_dir():
        raise UserError(f"prompt set '{name}' is a folder; point it at a .jsonl metadata file or a text file with one prompt per line")
    if not path.is_file():
        raise UserError(
            f"prompt set '{name}' is neither a file nor a built-in set; use one of "
            f"{', '.join(BUILTIN)}, a .jsonl metadata file or a text file with one prompt per line"
        )
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"prompt file '{path}' is not UTF-8 text (byte {error.object[error.start]:#04x} at offset "
                        f"{error.start}); save it as UTF-8") from None
    except OSError as error:
        raise UserError(f"cannot read prompt file '{path}': {error.strerror or error}") from None
    if path.suffix == ".jsonl":
        return _read_jsonl(text, str(path))
    return [{"prompt": line.strip()} for line in text.splitlines() if line.strip()]


def write_splits(folder: Path) -> tuple[int, int]:
    """Write ``train.jsonl``, ``test.jsonl`` and ``train_focus.jsonl`` into ``folder``; returns
    the train and test line counts."""
    train, test = split_prompts()
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("test.jsonl", test), ("train_focus.jsonl", focus_prompts(train))):
        with open(folder / name, "w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
    return len(train), len(test)


if __name__ == "__main__":
    counts = write_splits(Path(__file__).parent / "data")
    print(f"wrote {counts[0]} train and {counts[1]} test prompts")
