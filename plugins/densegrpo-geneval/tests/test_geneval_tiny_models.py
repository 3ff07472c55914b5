"""The ``geneval`` plumbing on tiny random Mask2Former + open_clip models, built in code (offline)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from densegrpo_geneval.classes import COLOR_TEMPLATES, COLORS, GENEVAL_CLASSES
from densegrpo_geneval.colors import ColorClassifier
from densegrpo_geneval.detector import Mask2FormerDetector
from densegrpo_geneval.reward import GenEvalReward
from densegrpo_geneval.tiny import tiny_mask2former, tiny_open_clip
from PIL import Image

METADATA = [
    {"tag": "colors", "include": [{"class": "cat", "count": 1, "color": "red"}], "prompt": "a photo of a red cat"},
    {"tag": "position", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
     "prompt": "a photo of a cat left of a dog"},
    {"tag": "counting", "include": [{"class": "cat", "count": 2}], "exclude": [{"class": "cat", "count": 3}],
     "prompt": "a photo of two cats"},
    None,
]  # fmt: skip


@pytest.fixture(scope="module")
def reward() -> GenEvalReward:
    built = GenEvalReward.tiny(seed=0)
    # push the class head towards "cat" so that random masks become confident cat detections
    with torch.no_grad():
        built.detector.model.class_predictor.bias[GENEVAL_CLASSES.index("cat")] += 20.0
    return built


def test_end_to_end_returns_finite_scores_in_unit_interval(reward, monkeypatch):
    calls = []
    classify = reward.color_classifier.classify
    monkeypatch.setattr(reward.color_classifier, "classify", lambda *a: calls.append(a[3]) or classify(*a))
    images = torch.rand(4, 3, 48, 56, generator=torch.Generator().manual_seed(0))
    prompts = [m["prompt"] if m else "a photo" for m in METADATA]
    for mode in ("partial", "strict", "correct"):
        reward.config.mode = mode
        scores = reward(images, prompts, METADATA)
        assert scores.shape == (4,) and scores.dtype == torch.float32
        assert torch.isfinite(scores[:3]).all() and ((scores[:3] >= 0) & (scores[:3] <= 1)).all()
        assert torch.isnan(scores[3])
    reward.config.mode = "partial"
    assert "cat" in calls  # the colour clause ran the CLIP classifier on detected cats


def test_detector_finds_instances_with_mask_boxes(reward):
    pixels = (np.random.default_rng(0).random((2, 40, 40, 3)) * 255).astype(np.uint8)
    per_image = reward.detector(pixels, min_score=0.3)
    assert len(per_image) == 2 and per_image[0], "the biased head should yield confident cats"
    for inst in per_image[0]:
        assert inst.label == "cat" and inst.score >= 0.3 and inst.mask.shape == (40, 40)
        x0, y0, x1, y1 = inst.box
        ys, xs = np.nonzero(inst.mask)
        assert (x0, y0, x1, y1) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)


def test_colour_logits_match_geneval_recipe_computed_independently():
    model, preprocess, tokenizer = tiny_open_clip(seed=3)
    classifier = ColorClassifier(model, preprocess, tokenizer)
    rng = np.random.default_rng(1)
    pixels = (rng.random((50, 60, 3)) * 255).astype(np.uint8)
    masks, boxes = [], []
    for (y0, y1, x0, x1) in [(5, 30, 10, 40), (20, 45, 30, 58)]:
        mask = np.zeros((50, 60), dtype=bool)
        mask[y0:y1, x0:x1] = rng.random((y1 - y0, x1 - x0)) > 0.3
        ys, xs = np.nonzero(mask)
        masks.append(mask)
        boxes.append((float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)))
    ours = classifier.logits(Image.fromarray(pixels), masks, boxes, "tennis racket")

    # GenEval: grey #999 behind the mask, crop to the box, open_clip eval transform; colour vectors as
    # clip_benchmark: each template embedded and L2-normalised, averaged, normalised again.
    with torch.no_grad():
        text = []
        for color in COLORS:
            rows = []
            for template in COLOR_TEMPLATES:
                e = model.encode_text(tokenizer([template.format(color=color, object="tennis racket")]))[0]
                rows.append(e / e.norm())
            mean = torch.stack(rows).mean(0)
            text.append(mean / mean.norm())
        text = torch.stack(text)
        expected = []
        for mask, (x0, y0, x1, y1) in zip(masks, boxes):
            grey = np.where(mask[..., None], pixels, np.uint8(0x99))
            crop = Image.fromarray(grey[int(y0):int(y1), int(x0):int(x1)])
            feature = model.encode_image(preprocess(crop)[None])[0]
            expected.append(100.0 * (feature / feature.norm()) @ text.T)
    torch.testing.assert_close(ours, torch.stack(expected), rtol=0, atol=1e-4)
    assert classifier.classify(Image.fromarray(pixels), masks, boxes, "tennis racket") == [
        COLORS[int(i)] for i in torch.stack(expected).argmax(1)
    ]


def test_detector_round_trips_through_a_local_folder(tmp_path):
    model, processor = tiny_mask2former(seed=1)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    pixels = (np.random.default_rng(2).random((1, 32, 32, 3)) * 255).astype(np.uint8)
    in_memory = Mask2FormerDetector(model, processor)(pixels)[0]
    loaded = Mask2FormerDetector.from_pretrained(str(tmp_path))(pixels)[0]
    assert [(i.label, round(i.score, 5), i.box) for i in in_memory] == [(i.label, round(i.score, 5), i.box) for i in loaded]


def test_offline_missing_weights_fail_in_one_line(tmp_path):
    model, processor = tiny_mask2former(seed=1)
    model.save_pretrained(tmp_path / "detector")
    processor.save_pretrained(tmp_path / "detector")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "import sys\nfrom densegrpo_geneval.reward import GenEvalReward\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n        GenEvalReward(GenEvalReward.Config(detector_path=path))\n"
        "    except Exception as e:\n        print(type(e).__name__, '|', e)\n"
    )
    detectors = ["facebook/mask2former-swin-small-coco-instance", str(tmp_path / "detector")]
    out = subprocess.run([sys.executable, "-c", code, *detectors], env=env, capture_output=True, text=True, timeout=300)
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 2, out.stdout + out.stderr
    for line, expect in zip(lines, ["detector_path", "clip_pretrained"]):
        assert line.startswith("MissingWeightsError |") and expect in line, line


def test_bad_inputs_are_value_errors(reward):
    with pytest.raises(ValueError, match="one of each per image"):
        reward(torch.rand(2, 3, 32, 32), ["a"], [None, None])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reward(torch.rand(3, 32, 32), ["a"], [None])
