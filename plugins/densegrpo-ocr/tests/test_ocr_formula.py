"""Flow-GRPO's OCR formula on hand-computed cases, and the reward's plumbing with a fake OCR engine."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from densegrpo_ocr.formula import extract_target, normalise, ocr_reward
from densegrpo_ocr.reward import OCRReward


@pytest.mark.parametrize(
    "prompt, target",
    [
        ('a sign that says "OPEN"', "OPEN"),
        ('"first" then "second"', "first"),
        ('a neon sign reading "Hello World" at night', "Hello World"),
        ('empty quotes ""', ""),
        ("no quotes at all", None),
        ('an unclosed " quote', None),
    ],
)
def test_target_is_text_between_first_pair_of_quotes(prompt, target):
    assert extract_target(prompt) == target


def test_normalise_lowercases_and_drops_spaces():
    assert normalise(" Hello  World ") == "helloworld"


@pytest.mark.parametrize(
    "recognised, target, expected",
    [
        ("OPEN", "OPEN", 1.0),
        ("WE ARE OPEN TODAY", "open", 1.0),  # substring: distance 0
        ("O p E n", "open", 1.0),  # case and spaces ignored
        ("Hello World", "helloworld", 1.0),
        ("opem", "open", 0.75),  # one substitution out of 4
        ("kitten", "sitting", 1.0 - 3.0 / 7.0),  # the textbook Levenshtein distance of 3
        ("", "open", 0.0),  # nothing recognised: d = len(target)
        ("completely unrelated text", "ab", 0.0),  # d clipped to len(target)
        ("pen", "open", 0.75),  # one deletion
    ],
)
def test_formula_hand_cases(recognised, target, expected):
    assert ocr_reward(recognised, target) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("target", [None, "", "   "])
def test_no_target_is_nan(target):
    assert math.isnan(ocr_reward("anything", target))


class FakeEngine:
    """Returns fixed lines and records what it was given."""

    def __init__(self, lines):
        self.lines = lines
        self.seen: list[np.ndarray] = []

    def read(self, image):
        self.seen.append(image)
        return self.lines


def test_lines_are_joined_and_low_confidence_dropped():
    engine = FakeEngine([("HEL", 0.99), ("garbage", 0.2), ("LO", 0.9)])
    reward = OCRReward.from_backend(engine)
    scores = reward(torch.zeros(1, 3, 8, 8), ['"hello"'], [None])
    assert scores.tolist() == [1.0]


def test_prompts_without_target_are_nan_and_skip_ocr():
    engine = FakeEngine([("open", 0.99)])
    reward = OCRReward.from_backend(engine)
    scores = reward(torch.rand(3, 3, 8, 8), ['say "open"', "no text here", 'say "shut"'], [None] * 3)
    assert scores.dtype == torch.float32 and scores.shape == (3,)
    assert scores[0] == 1.0 and math.isnan(scores[1]) and scores[2] == 0.0  # 'open' vs 'shut': 4 substitutions
    assert len(engine.seen) == 2


def test_images_reach_the_engine_as_rgb_uint8_hwc():
    engine = FakeEngine([])
    image = torch.zeros(1, 3, 4, 5)
    image[0, 0] = 1.0  # pure red
    OCRReward.from_backend(engine)(image, ['"x"'], [None])
    (seen,) = engine.seen
    assert seen.shape == (4, 5, 3) and seen.dtype == np.uint8
    assert (seen[..., 0] == 255).all() and (seen[..., 1:] == 0).all()


def test_bad_shapes_are_value_errors():
    reward = OCRReward.from_backend(FakeEngine([]))
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(torch.rand(2, 3, 8, 8), ['"a"'], [None])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reward(torch.rand(3, 8, 8), ['"a"'], [None])
