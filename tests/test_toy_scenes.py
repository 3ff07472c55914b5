"""Toy world: renderer, prompts and the renderer/detector round trip (seeded, CPU, seconds)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from densegrpo.contracts.errors import UserError
from densegrpo.worlds.geneval_rules import TAGS, strict_correct
from densegrpo.worlds.toy.detector import ToyDetector
from densegrpo.worlds.toy.prompts import focus_prompts, load_prompts
from densegrpo.worlds.toy.scenes import (
    PALETTE,
    SHAPES,
    Scene,
    SceneObject,
    render,
    render_batch,
    sample_scenes,
    scene_from_metadata,
    truth_detections,
)


@pytest.fixture(scope="module")
def all_prompts():
    return load_prompts("toy-train") + load_prompts("toy-test")


def test_render_layout_and_colours():
    scene = Scene([SceneObject("square", "blue", 0.5, 0.5, 0.375)])
    image = render(scene, 32)
    assert image.shape == (32, 32, 3) and image.dtype == np.float32
    assert image.min() >= 0 and image.max() <= 1
    np.testing.assert_allclose(image[16, 16], PALETTE["blue"], atol=1e-6)
    np.testing.assert_allclose(image[0, 0], (1, 1, 1))


@pytest.mark.parametrize("shape, area", [("circle", math.pi / 4), ("square", 1.0), ("triangle", 0.5)])
def test_render_coverage_matches_geometric_area(shape, area):
    # black on white: coverage = 1 - pixel value; side 10 px at 32 px
    side = 10 / 32
    image = render(Scene([SceneObject(shape, "black", 0.51, 0.47, side)]), 32)
    black = np.asarray(PALETTE["black"])
    coverage = (1 - image[..., 0]) / (1 - black[0])
    assert coverage.sum() == pytest.approx(area * 100, rel=0.03)


def test_render_batch_is_seeded(all_prompts):
    metas = all_prompts[:16]
    a, b = render_batch(metas, seed=3), render_batch(metas, seed=3)
    c = render_batch(metas, seed=4)
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert render_batch(metas[:2], seed=0, size=64).shape == (2, 3, 64, 64)


def test_scenes_satisfy_their_metadata(all_prompts):
    scenes = sample_scenes(all_prompts, seed=1)
    for meta, scene in zip(all_prompts, scenes):
        assert strict_correct(meta, truth_detections(scene)), meta["prompt"]
        assert 1 <= len(scene.objects) <= 4
        for i, a in enumerate(scene.objects):
            x0, y0, x1, y1 = a.box()
            assert 0 <= x0 and 0 <= y0 and x1 <= 1 and y1 <= 1
            assert 8 / 32 - 1e-9 <= a.size <= 12 / 32 + 1e-9
            for b in scene.objects[i + 1 :]:
                bx0, by0, bx1, by1 = b.box()
                assert x1 <= bx0 or bx1 <= x0 or y1 <= by0 or by1 <= y0  # no overlap


def test_scene_from_metadata_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="class"):
        scene_from_metadata({"include": [{"class": "dog", "count": 1}]}, rng)
    with pytest.raises(ValueError, match="at most 4"):
        scene_from_metadata({"include": [{"class": "circle", "count": 5}]}, rng)
    with pytest.raises(ValueError, match="include"):
        scene_from_metadata({"prompt": "x"}, rng)


def test_prompt_files_are_geneval_format_and_disjoint():
    train, test = load_prompts("toy-train"), load_prompts("toy-test")
    assert len(train) == 234 and len(test) == 81
    assert not {m["prompt"] for m in train} & {m["prompt"] for m in test}
    for rows in (train, test):
        assert {m["tag"] for m in rows} == set(TAGS)
        for m in rows:
            assert set(m) <= {"tag", "include", "exclude", "prompt"}
            assert list(m)[0] == "tag" and list(m)[-1] == "prompt"  # GenEval's key order
            for req in m["include"]:
                assert req["class"] in SHAPES and req["count"] >= 1
                assert set(req) <= {"class", "count", "color", "position"}
    prompts = {m["prompt"]: m for m in train + test}
    assert prompts["a photo of an orange circle"]["include"] == [{"class": "circle", "count": 1, "color": "orange"}]
    assert prompts["a photo of three triangles"]["exclude"] == [{"class": "triangle", "count": 4}]
    left = prompts["a photo of a circle left of a square"]["include"]
    assert left == [{"class": "square", "count": 1}, {"class": "circle", "count": 1, "position": ["left of", 0]}]


def test_focus_set_is_eight_training_color_attr_prompts_and_regenerates():
    train, test, focus = load_prompts("toy-train"), load_prompts("toy-test"), load_prompts("toy-train-focus")
    assert len(focus) == 8 and {m["tag"] for m in focus} == {"color_attr"}
    assert len({m["prompt"] for m in focus}) == 8
    assert all(m in train for m in focus)
    assert not {m["prompt"] for m in focus} & {m["prompt"] for m in test}
    assert focus == focus_prompts(train)  # the shipped file is what `python -m densegrpo.worlds.toy.prompts` writes
    assert focus_prompts(train, seed=1) != focus


def test_load_prompts_files(tmp_path):
    text = tmp_path / "prompts.txt"
    text.write_text("two red circles\n\n a blue square \n", encoding="utf-8")
    assert load_prompts(text) == [{"prompt": "two red circles"}, {"prompt": "a blue square"}]
    jsonl = tmp_path / "meta.jsonl"
    row = {"tag": "single_object", "include": [{"class": "circle", "count": 1}], "prompt": "a photo of a circle"}
    jsonl.write_text(json.dumps(row) + "\n", encoding="utf-8")
    assert load_prompts(str(jsonl)) == [row]
    jsonl.write_text("{not json\n", encoding="utf-8")
    with pytest.raises(UserError, match="line 1"):
        load_prompts(jsonl)
    with pytest.raises(UserError, match="toy-train"):
        load_prompts(tmp_path / "missing.jsonl")


def test_detector_round_trip(all_prompts):
    """~300 seeded scenes: every object found with its shape, colour and box."""
    metas = (all_prompts * 2)[:300]
    scenes = sample_scenes(metas, seed=7)
    images = torch.from_numpy(np.stack([render(s) for s in scenes])).permute(0, 3, 1, 2)
    detections = ToyDetector().detect(images)
    for meta, scene, dets in zip(metas, scenes, detections):
        assert len(dets) == len(scene.objects), meta["prompt"]
        truth = sorted((o.shape, o.color, o.box(32)) for o in scene.objects)
        found = sorted((d.cls, d.color, d.box) for d in dets)
        for (shape, color, box), (cls, col, dbox) in zip(truth, found):
            assert (cls, col) == (shape, color)
            np.testing.assert_allclose(dbox, box, atol=1.0)
        assert min(d.confidence for d in dets) > 0.9  # clean renders pass GenEval's counting threshold
        assert strict_correct(meta, dets), meta["prompt"]


def test_detector_sizes_and_junk():
    metas = load_prompts("toy-test")[:8]
    small = render_batch(metas, seed=0)
    large = render_batch(metas, seed=0, size=96)
    upscaled = F.interpolate(small, size=(64, 64), mode="bilinear", align_corners=False)
    detector = ToyDetector()
    for images, scale in ((large, 3), (upscaled, 2)):
        for a, b in zip(detector.detect(small), detector.detect(images)):
            a, b = sorted(a, key=lambda d: d.box), sorted(b, key=lambda d: d.box)
            assert [(d.cls, d.color) for d in a] == [(d.cls, d.color) for d in b]
            np.testing.assert_allclose([d.box for d in b], [[v * scale for v in d.box] for d in a], atol=1.5 * scale)
    with pytest.raises(ValueError, match="32x32"):
        detector.detect(torch.rand(1, 3, 16, 16))
    assert detector.detect(torch.ones(2, 3, 32, 32)) == [[], []]  # blank
    noise = detector.detect(torch.rand(4, 3, 48, 48, generator=torch.Generator().manual_seed(0)))
    assert all(d.confidence < 0.3 for dets in noise for d in dets)  # junk never passes GenEval's threshold
