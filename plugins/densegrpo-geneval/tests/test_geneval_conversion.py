"""The plugin's detections -> shared GenEval rules, on hand-built scenes for every tag.

A fake detector returns hand-made instance masks. A stub colour classifier names the mean colour
under each mask. The expected scores are worked out by hand from method.md section 5 and
GenEval's ``evaluate``. This checks the conversion (mask -> box, score -> confidence, GenEval's
thresholds and colour assignment per detection), not the rules themselves (tests/test_geneval_rules.py).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from densegrpo.api import UserError
from densegrpo_geneval.detector import Instance, box_from_mask
from densegrpo_geneval.errors import MetadataError
from densegrpo_geneval.reward import GenEvalReward

SIZE = 100
PALETTE = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}


class Scene:
    """A grey canvas with coloured rectangles, and the instances a perfect detector would return."""

    def __init__(self) -> None:
        self.pixels = np.full((SIZE, SIZE, 3), 128, dtype=np.uint8)
        self.instances: list[Instance] = []

    def add(self, label: str, score: float, color: str, x0: int, y0: int, x1: int, y1: int) -> "Scene":
        self.pixels[y0:y1, x0:x1] = PALETTE[color]
        mask = np.zeros((SIZE, SIZE), dtype=bool)
        mask[y0:y1, x0:x1] = True
        self.instances.append(Instance(label, score, mask, box_from_mask(mask)))
        return self

    def tensor(self) -> torch.Tensor:
        return torch.from_numpy(self.pixels).permute(2, 0, 1).float()[None] / 255.0


class FakeDetector:
    def __init__(self, scenes: list[Scene]) -> None:
        self.scenes = scenes
        self.min_scores: list[float] = []

    def __call__(self, pixels: np.ndarray, min_score: float = 0.0) -> list[list[Instance]]:
        self.min_scores.append(min_score)
        out = []
        for image in pixels:
            scene = next(s for s in self.scenes if np.array_equal(s.pixels, image))
            out.append([inst for inst in scene.instances if inst.score >= min_score])
        return out


class MeanColorClassifier:
    """Names the palette colour nearest to the mean pixel under each mask; records its calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def classify(self, image, masks, boxes, object_name):
        self.calls.append((object_name, len(masks)))
        pixels = np.asarray(image)
        names = []
        for mask, box in zip(masks, boxes):
            assert box == box_from_mask(mask)  # each mask travels with its own box
            mean = pixels[mask].mean(axis=0)
            names.append(min(PALETTE, key=lambda c: np.abs(mean - PALETTE[c]).sum()))
        return names


def score(scene: Scene, metadata: dict, mode: str, **config) -> tuple[float, MeanColorClassifier]:
    classifier = MeanColorClassifier()
    reward = GenEvalReward(
        GenEvalReward.Config(mode=mode, **config), detector=FakeDetector([scene]), color_classifier=classifier
    )
    value = reward(scene.tensor(), [metadata.get("prompt", "")], [metadata])
    assert value.shape == (1,) and value.dtype == torch.float32
    return float(value[0]), classifier


def meta(tag: str, include: list, exclude: list | None = None) -> dict:
    record = {"tag": tag, "include": include, "prompt": f"a {tag} prompt"}
    if exclude:
        record["exclude"] = exclude
    return record


def test_box_from_mask_is_mmdet_mask2bbox():
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:8] = True
    assert box_from_mask(mask) == (3.0, 2.0, 8.0, 5.0)
    assert box_from_mask(np.zeros((4, 4), dtype=bool)) is None


SINGLE = meta("single_object", [{"class": "cat", "count": 1}])
TWO = meta("two_object", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1}])
THREE_DOGS = meta("counting", [{"class": "dog", "count": 3}], [{"class": "dog", "count": 4}])
RED_CAR = meta("colors", [{"class": "car", "count": 1, "color": "red"}])
DOG_RIGHT_OF_CAT = meta("position", [{"class": "cat", "count": 1}, {"class": "dog", "count": 1, "position": ["right of", 0]}])
RED_CAT_BLUE_DOG = meta("color_attr", [{"class": "cat", "count": 1, "color": "red"}, {"class": "dog", "count": 1, "color": "blue"}])

CASES = [
    # (name, scene, metadata, (partial, strict, correct))
    ("single: one cat", Scene().add("cat", 0.95, "white", 10, 10, 40, 40), SINGLE, (1.0, 1.0, 1.0)),
    ("single: cat below 0.3", Scene().add("cat", 0.25, "white", 10, 10, 40, 40), SINGLE, (0.0, 0.0, 0.0)),
    # two cats for "a cat": GenEval's rule uses the best one; strict and partial want exactly one
    ("single: two cats", Scene().add("cat", 0.9, "white", 5, 5, 30, 30).add("cat", 0.8, "white", 60, 60, 90, 90), SINGLE, (0.0, 0.0, 1.0)),
    ("two: dog too weak", Scene().add("cat", 0.9, "white", 5, 5, 30, 30).add("dog", 0.29, "white", 60, 60, 90, 90), TWO, (0.5, 0.0, 0.0)),
    ("two: both", Scene().add("cat", 0.9, "white", 5, 5, 30, 30).add("dog", 0.31, "white", 60, 60, 90, 90), TWO, (1.0, 1.0, 1.0)),
    # counting uses 0.9: the 0.5 dog does not count, so exactly three and the exclude holds
    ("counting: 0.9 threshold", Scene().add("dog", 0.95, "white", 0, 0, 20, 20).add("dog", 0.92, "white", 30, 0, 50, 20)
     .add("dog", 0.91, "white", 60, 0, 80, 20).add("dog", 0.5, "white", 0, 60, 20, 80), THREE_DOGS, (1.0, 1.0, 1.0)),
    # two of three: count credit 1 - 1/3, exclude credit 1
    ("counting: two of three", Scene().add("dog", 0.95, "white", 0, 0, 20, 20).add("dog", 0.92, "white", 30, 0, 50, 20)
     .add("dog", 0.85, "white", 60, 0, 80, 20), THREE_DOGS, ((2 / 3 + 1) / 2, 0.0, 0.0)),
    ("colors: red car", Scene().add("car", 0.8, "red", 20, 20, 60, 60), RED_CAR, (1.0, 1.0, 1.0)),
    ("colors: blue car", Scene().add("car", 0.8, "blue", 20, 20, 60, 60), RED_CAR, (0.5, 0.0, 0.0)),
    # GenEval judges the colour of the most confident car only
    ("colors: best car red", Scene().add("car", 0.9, "red", 0, 0, 30, 30).add("car", 0.6, "blue", 60, 60, 90, 90), RED_CAR, (0.0, 0.0, 1.0)),
    ("colors: best car blue", Scene().add("car", 0.6, "red", 0, 0, 30, 30).add("car", 0.9, "blue", 60, 60, 90, 90), RED_CAR, (0.0, 0.0, 0.0)),
    ("position: right of", Scene().add("cat", 0.9, "white", 5, 40, 30, 60).add("dog", 0.9, "white", 65, 40, 95, 60), DOG_RIGHT_OF_CAT, (1.0, 1.0, 1.0)),
    ("position: left of", Scene().add("cat", 0.9, "white", 65, 40, 95, 60).add("dog", 0.9, "white", 5, 40, 30, 60), DOG_RIGHT_OF_CAT, (2 / 3, 0.0, 0.0)),
    ("color_attr: both right", Scene().add("cat", 0.9, "red", 5, 5, 40, 40).add("dog", 0.9, "blue", 55, 55, 95, 95), RED_CAT_BLUE_DOG, (1.0, 1.0, 1.0)),
    ("color_attr: green dog", Scene().add("cat", 0.9, "red", 5, 5, 40, 40).add("dog", 0.9, "green", 55, 55, 95, 95), RED_CAT_BLUE_DOG, (0.75, 0.0, 0.0)),
]


@pytest.mark.parametrize("name, scene, metadata, expected", CASES, ids=[c[0] for c in CASES])
def test_every_tag_in_every_mode(name, scene, metadata, expected):
    for mode, value in zip(("partial", "strict", "correct"), expected):
        got, _ = score(scene, metadata, mode)
        assert got == pytest.approx(value, abs=1e-6), f"{name}: {mode}"  # float32 output


def test_colours_are_classified_only_for_classes_a_clause_colours():
    scene = Scene().add("cat", 0.9, "red", 5, 5, 40, 40).add("dog", 0.9, "blue", 55, 55, 95, 95)
    _, classifier = score(scene, TWO, "partial")
    assert classifier.calls == []
    _, classifier = score(scene, meta("colors", [{"class": "dog", "count": 1, "color": "blue"}]), "partial")
    assert classifier.calls == [("dog", 1)]


def test_detector_is_asked_for_scores_above_the_lower_threshold():
    scene = Scene().add("cat", 0.95, "white", 10, 10, 40, 40)
    detector = FakeDetector([scene])
    reward = GenEvalReward(GenEvalReward.Config(), detector=detector, color_classifier=MeanColorClassifier())
    reward(scene.tensor(), ["p"], [SINGLE])
    assert detector.min_scores == [0.3]


def test_max_objects_caps_detections_per_class():
    scene = Scene()
    for i in range(5):
        scene.add("dog", 0.95 - 0.01 * i, "white", 18 * i, 0, 18 * i + 15, 15)
    five = meta("counting", [{"class": "dog", "count": 5}])
    assert score(scene, five, "strict")[0] == 1.0
    assert score(scene, five, "strict", max_objects=4)[0] == 0.0


def test_metadata_jsonl_lookup_by_prompt(tmp_path):
    lines = [dict(SINGLE, prompt="a photo of a cat"), dict(RED_CAR, prompt="a photo of a red car")]
    path = tmp_path / "evaluation_metadata.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    cat = Scene().add("cat", 0.95, "white", 10, 10, 40, 40)
    car = Scene().add("car", 0.95, "blue", 10, 10, 40, 40)
    reward = GenEvalReward(
        GenEvalReward.Config(metadata_file=str(path)),
        detector=FakeDetector([cat, car]),
        color_classifier=MeanColorClassifier(),
    )
    images = torch.cat([cat.tensor(), car.tensor(), cat.tensor()])
    scores = reward(images, ["a photo of a cat", "a photo of a red car", "not in the file"], [None, None, None])
    assert scores[0] == 1.0 and scores[1] == 0.5 and math.isnan(scores[2])


def test_malformed_metadata_file_is_one_line_user_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"tag": "single_object", "include": []}\n{not json\n')
    with pytest.raises(MetadataError) as caught:
        GenEvalReward(GenEvalReward.Config(metadata_file=str(path)), detector=object(), color_classifier=object())
    assert isinstance(caught.value, UserError) and "bad.jsonl:2" in str(caught.value) and "\n" not in str(caught.value)


def test_position_threshold_reaches_the_rules():
    # centres 20 px apart, boxes 50 px wide: 0.1 * (50 + 50) leaves 10 of 20 (ratio 0.5, not > 0.5)
    scene = Scene().add("cat", 0.9, "white", 0, 40, 50, 60).add("dog", 0.9, "white", 20, 40, 70, 60)
    assert score(scene, DOG_RIGHT_OF_CAT, "correct")[0] == 0.0
    assert score(scene, DOG_RIGHT_OF_CAT, "correct", position_threshold=0.05)[0] == 1.0
