"""The fast toy detector (interval templates, flat-index pixel stage) against a frozen copy of the
detector it replaced (``ReferenceToyDetector`` in benchmarks/bench_toy_detector.py), and its
template coverage against point-by-point supersampling."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from densegrpo.worlds.geneval_rules import partial_score
from densegrpo.worlds.toy import detector as fast_detector
from densegrpo.worlds.toy.detector import ToyDetector, _templates
from densegrpo.worlds.toy.prompts import load_prompts
from densegrpo.worlds.toy.scenes import SUPERSAMPLE, render_scenes, sample_scenes


def _load_bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_toy_detector.py"
    spec = importlib.util.spec_from_file_location("bench_toy_detector", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def reference():
    return _load_bench().ReferenceToyDetector()


@pytest.fixture(scope="module")
def scenes():
    metas = load_prompts("toy-test")
    return metas, render_scenes(sample_scenes(metas, seed=3))


def assert_same_detections(images, metas, reference, minimum):
    new, old = ToyDetector().detect(images), reference.detect(images)
    assert sum(map(len, old)) >= minimum  # the comparison has something to compare
    for a, b in zip(new, old):
        assert [(d.cls, d.color) for d in a] == [(d.cls, d.color) for d in b]
        for x, y in zip(a, b):
            np.testing.assert_allclose(x.box, y.box, rtol=0, atol=1e-9)
            assert abs(x.confidence - y.confidence) <= 1e-9
    if metas is not None:
        assert [partial_score(m, d) for m, d in zip(metas, new)] == [partial_score(m, d) for m, d in zip(metas, old)]


def test_renders_blurred_noisy_and_upscaled_match_the_reference(scenes, reference):
    metas, clean = scenes
    box_blur = F.avg_pool2d(F.pad(clean, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    noisy = (clean + 0.08 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    for images in (clean, 0.5 * clean + 0.5 * box_blur, box_blur, noisy):
        assert_same_detections(images, metas, reference, minimum=len(metas))
    upscaled = F.interpolate(clean[:40], size=(48, 48), mode="bilinear", align_corners=False)
    assert_same_detections(upscaled, metas[:40], reference, minimum=40)


def test_latent_toy_decodes_match_the_reference(scenes, reference):
    """The shipped latent toy's decoder on random latents and on noisy latents of renders (stand-ins
    for the dense engine's per-step clean estimates; benchmarks/bench_toy_detector.py
    --compare-reference also checks real ODE samples and their per-step estimates)."""
    from densegrpo.worlds.toy.autoencoder import ToyAutoencoder
    from densegrpo.worlds.toy.latent_policy import packaged_latent_weights

    metas, clean = scenes[0][:160], scenes[1][:160]
    autoencoder = ToyAutoencoder.from_pretrained(packaged_latent_weights() / "autoencoder").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        random = autoencoder.decode(autoencoder.unscale_latents(torch.randn(128, 4, 4, 4, generator=generator)))
        latents = autoencoder.scale_latents(autoencoder.encode(clean))
        for noise in (0.0, 0.3, 0.7):
            noisy = (1 - noise) * latents + noise * torch.randn(latents.shape, generator=generator)
            decoded = autoencoder.decode(autoencoder.unscale_latents(noisy))
            assert_same_detections(decoded, metas, reference, minimum=len(metas) // 2)
    assert_same_detections(random, None, reference, minimum=128)


def brute_force_templates(side, box_cy, cx, left, top, window):
    """Every supersampling point tested: the frozen reference's templates."""
    return _load_bench().reference_templates(side, box_cy, cx, left, top, window)


def hypotheses(count, seed, ties):
    rng = np.random.default_rng(seed)
    window = 16
    if ties:  # centres and sizes on the supersampling grid: boundaries fall exactly on sample points
        cx = 8 + rng.integers(0, 16 * SUPERSAMPLE, count) / SUPERSAMPLE + rng.choice([0, 1 / 8], count)
        cy = 8 + rng.integers(0, 16 * SUPERSAMPLE, count) / SUPERSAMPLE + rng.choice([0, 1 / 8], count)
        side = rng.integers(1, 18 * SUPERSAMPLE, (count, 3)) / (SUPERSAMPLE / 2)
    else:
        cx, cy = rng.uniform(2, 30, count), rng.uniform(2, 30, count)
        side = np.sqrt(rng.uniform(0.5, 300, count))[:, None] * np.array([2 / np.sqrt(np.pi), 1.0, np.sqrt(2)])
    box_cy = np.stack([cy, cy, cy - side[:, 2] / 6], axis=1)
    left, top = np.floor(cx).astype(int) - window // 2, np.floor(cy).astype(int) - window // 2
    return side, box_cy, cx, left, top, window


@pytest.mark.parametrize("ties", [False, True])
def test_interval_templates_equal_point_by_point_supersampling(ties):
    args = hypotheses(400, seed=int(ties), ties=ties)
    expected = brute_force_templates(*args)
    fast = _templates(*args)
    assert fast.dtype == np.float32 and fast.shape == (400, 3, 16, 16)
    assert np.array_equal(fast, expected)
    assert np.array_equal(_templates(*args, prove=False), expected)  # the every-point fallback
    assert 0.1 < (expected > 0).mean() < 0.9  # templates neither empty nor full
    side, box_cy, cx, left, top, window = args
    assert not np.array_equal(_templates(side, box_cy, cx + 1 / 16, left, top, window), expected)  # sensitive to cx


def test_dilation_equals_grey_dilation():
    from scipy import ndimage

    labels = np.random.default_rng(0).integers(0, 5, (6, 32, 32)) * (np.random.default_rng(1).random((6, 32, 32)) < 0.1)
    expected = ndimage.grey_dilation(labels, footprint=fast_detector._STRUCTURE)
    assert np.array_equal(fast_detector._dilate(labels), expected)
    assert not np.array_equal(expected, labels)
