"""video-frames: an image reward on sampled frames of (N, F, 3, H, W) videos, reduced per video."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from densegrpo.components.rewards.video_frames import frame_indices
from densegrpo.contracts import registry
from densegrpo.contracts.errors import ConfigError

TARGET = 0.8


@pytest.fixture(autouse=True)
def _tests_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))


def video_reward(**options):
    spec = {"image_reward": {"name": "loop_components:BrightnessReward", "config": {"target": TARGET}}, **options}
    return registry.load("rewards", "video-frames", spec)


def videos(seed=0, frames=7):
    return torch.rand(3, frames, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def by_hand(frame):
    return -abs(float(frame.mean()) - TARGET)  # BrightnessReward's formula, one frame at a time


@pytest.mark.parametrize("reduce", ["mean", "min", "max"])
def test_scores_are_the_declared_reduction_of_the_image_reward_over_sampled_frames(reduce):
    clips = videos()
    reward = video_reward(frames=3, reduce=reduce)
    scores = reward(clips, ["a", "b", "c"], [None] * 3)
    assert scores.shape == (3,) and scores.dtype == torch.float32
    assert frame_indices(7, 3) == [0, 3, 6]  # first, middle, last
    for i in range(3):
        per_frame = [by_hand(clips[i, f]) for f in (0, 3, 6)]
        expected = {"mean": sum(per_frame) / 3, "min": min(per_frame), "max": max(per_frame)}[reduce]
        assert scores[i].item() == pytest.approx(expected, abs=1e-6)


def test_every_frame_by_default_and_prompts_follow_their_video():
    clips = videos(seed=1, frames=4)
    seen = []

    class Recorder:
        def __call__(self, images, prompts, metadata):
            seen.append((images.shape, prompts, metadata))
            return images.flatten(1).mean(1)

    reward = video_reward()
    reward.image_reward = Recorder()
    scores = reward(clips, ["a", "b", "c"], [{"k": 1}, None, {"k": 3}])
    shape, prompts, metadata = seen[0]
    assert shape == (12, 3, 8, 8)
    assert prompts == ["a"] * 4 + ["b"] * 4 + ["c"] * 4 and metadata[:4] == [{"k": 1}] * 4
    assert torch.allclose(scores, clips.flatten(2).mean(2).mean(1), atol=1e-6)


def test_nan_frames_are_left_out_and_all_nan_is_nan():
    from densegrpo.components.rewards.video_frames import reduce_frames

    scores = torch.tensor([[1.0, float("nan"), 3.0], [float("nan")] * 3])
    assert reduce_frames(scores, "mean")[0].item() == 2.0 and reduce_frames(scores, "max")[0].item() == 3.0
    assert reduce_frames(scores, "min")[0].item() == 1.0
    assert all(torch.isnan(reduce_frames(scores, how)[1]) for how in ("mean", "min", "max"))


def test_images_score_as_one_frame_videos_and_bad_inputs_are_clear():
    reward = video_reward()
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    assert reward(images, ["a", "b"], [None, None])[1].item() == pytest.approx(by_hand(images[1]), abs=1e-6)
    with pytest.raises(ValueError, match=r"\(N,F,3,H,W\)"):
        reward(torch.rand(2, 4, 8, 8, 3), ["a", "b"], [None, None])
    with pytest.raises(ConfigError, match="image_reward"):
        registry.load("rewards", "video-frames", {"frames": 2})
