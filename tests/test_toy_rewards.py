"""The toy rewards: toy-geneval (detector + GenEval rules) and toy-clip (shipped tiny open_clip)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from densegrpo.contracts import registry
from densegrpo.contracts.errors import ConfigError
from densegrpo.worlds.geneval_rules import strict_correct
from densegrpo.worlds.toy.clip_model import CLIP_VOCAB_SIZE, ToyCLIP
from densegrpo.worlds.toy.prompts import load_prompts
from densegrpo.worlds.toy.scenes import render_scenes, sample_scenes, truth_detections


@pytest.fixture(scope="module")
def test_set():
    metas = load_prompts("toy-test")
    scenes = sample_scenes(metas * 2, seed=11)
    return metas * 2, scenes, render_scenes(scenes)


@pytest.fixture(scope="module")
def geneval():
    return registry.load("rewards", "toy-geneval", {})


@pytest.fixture(scope="module")
def clip():
    return registry.load("rewards", "toy-clip", {})


def prompts_of(metas):
    return [m["prompt"] for m in metas]


# ---------------------------------------------------------------- toy-geneval


def test_geneval_matching_renders_score_one(geneval, test_set):
    metas, _, images = test_set
    scores = geneval(images, prompts_of(metas), metas)
    assert scores.shape == (len(metas),) and scores.dtype == torch.float32
    assert torch.all(scores == 1.0)


def test_geneval_mismatching_renders_score_lower(geneval, test_set):
    metas, scenes, images = test_set
    shifted = metas[1:] + metas[:1]
    scores = geneval(images, prompts_of(shifted), shifted)
    # ground truth: how many of the shifted prompts the scenes really satisfy
    truly = torch.tensor([strict_correct(m, truth_detections(s)) for m, s in zip(shifted, scenes)])
    assert torch.all(scores[truly] == 1.0)
    assert torch.all(scores[~truly] < 1.0)
    assert scores[~truly].mean() < 0.7


@pytest.mark.parametrize("mode", ["strict", "correct"])
def test_geneval_binary_modes(mode, test_set):
    metas, _, images = test_set
    reward = registry.load("rewards", "toy-geneval", {"mode": mode})
    assert torch.all(reward(images, prompts_of(metas), metas) == 1.0)
    shifted = metas[1:] + metas[:1]
    scores = reward(images, prompts_of(shifted), shifted)
    assert set(scores.tolist()) <= {0.0, 1.0} and scores.mean() < 0.5


def test_geneval_nan_when_not_applicable(geneval, test_set):
    metas, _, images = test_set
    meta = [metas[0], None, {"prompt": "no include"}, metas[3]]
    scores = geneval(images[:4], prompts_of(metas[:4]), meta)
    assert scores[0] == 1.0 and scores[3] == 1.0
    assert math.isnan(scores[1]) and math.isnan(scores[2])


def test_geneval_any_size_at_least_32(geneval, test_set):
    metas, scenes, images = test_set
    base = geneval(images[:40], prompts_of(metas[:40]), metas[:40])
    for size in (48, 64, 100):
        resized = F.interpolate(images[:40], size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
        assert torch.equal(geneval(resized, prompts_of(metas[:40]), metas[:40]), base)
    with pytest.raises(ValueError, match="32x32"):
        geneval(images[:2, :, :16, :16], prompts_of(metas[:2]), metas[:2])
    with pytest.raises(ValueError, match="N prompts"):
        geneval(images[:2], prompts_of(metas[:3]), metas[:3])


def test_geneval_detect_and_config(geneval, test_set):
    metas, scenes, images = test_set
    detections = geneval.detect(images[:5])
    assert [len(d) for d in detections] == [len(s.objects) for s in scenes[:5]]
    with pytest.raises(ConfigError, match="mode"):
        registry.load("rewards", "toy-geneval", {"mode": "lenient"})


# ---------------------------------------------------------------- toy-clip


def test_toy_clip_tokenizer_and_weights():
    model = ToyCLIP.load()
    assert len(model.tokenizer.encoder) == CLIP_VOCAB_SIZE == 49408
    assert model.model.token_embedding.num_embeddings == CLIP_VOCAB_SIZE


def test_toy_clip_ranks_matching_caption_first_on_held_out_scenes(clip, test_set):
    metas, scenes, images = test_set
    own = clip(images, prompts_of(metas), metas)
    assert own.shape == (len(metas),) and own.dtype == torch.float32
    rng = np.random.default_rng(0)
    wins, pairs = 0, 0
    for _ in range(3):
        other = [metas[i] for i in rng.permutation(len(metas))]
        false = torch.tensor([not strict_correct(m, truth_detections(s)) for m, s in zip(other, scenes)])
        other_scores = clip(images, prompts_of(other), other)
        wins += int((own > other_scores)[false].sum())
        pairs += int(false.sum())
    assert pairs > 300
    assert wins / pairs >= 0.8


def test_toy_clip_sizes_and_pickscore_formula(clip, test_set):
    metas, _, images = test_set
    base = clip(images[:16], prompts_of(metas[:16]), None)
    larger = F.interpolate(images[:16], size=(64, 64), mode="bilinear", align_corners=False)
    resized = clip(larger, prompts_of(metas[:16]), None)
    # resizing back to 32 px softens edges a little: scores move by a fraction of their spread
    assert torch.corrcoef(torch.stack([base, resized]))[0, 1] > 0.9
    assert (resized - base).abs().mean() < 0.3 * base.std()
    # PickScore formula by hand from the model's own parts
    model = clip.model
    with torch.no_grad():
        image = model.model.encode_image(model.preprocess(images[:4]))
        text = model.model.encode_text(model.tokenize(prompts_of(metas[:4])))
        expected = model.model.logit_scale.exp() * F.cosine_similarity(image, text, dim=-1)
    torch.testing.assert_close(base[:4], expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="one prompt per image"):
        clip(images[:2], ["a"], None)
