"""``video-frames``: any image reward as a video reward, scored on sampled frames and reduced.

Video policies (``wan``) decode to ``videos (N, F, 3, H, W)`` float32 in [0, 1], frames in time
order (the layout of diffusers' ``WanPipeline(output_type="pt")``). This reward picks
``frames`` of them evenly spaced from the first to the last, scores every picked frame with the
image reward ``image_reward`` (its prompt and metadata are the video's) and reduces each video's
frame scores with ``reduce``. Flow-GRPO's video rewards score frames the same way (train_wan2_1.py
hands them the same ``(N, F, 3, H, W)`` videos).

Example (a run config)::

    rewards:
      - name: video-frames
        config:
          image_reward: {name: pickscore, config: {divisor: 26}}
          frames: 8
          reduce: mean
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from densegrpo.contracts.config import ComponentSpec
from densegrpo.contracts.errors import UserError


def frame_indices(num_frames: int, wanted: int | None) -> list[int]:
    """``wanted`` frame indices evenly spaced over ``0 .. num_frames - 1`` (first and last included);
    every frame when ``wanted`` is None or at least ``num_frames``."""
    if wanted is None or wanted >= num_frames:
        return list(range(num_frames))
    if wanted == 1:
        return [num_frames // 2]
    return torch.linspace(0, num_frames - 1, wanted).round().long().tolist()


class VideoFramesReward:
    """Scores ``videos (N,F,3,H,W)`` with an image reward on sampled frames -> ``(N,)`` float32.

    ``reduce``: ``mean`` (frames whose score is NaN, "not applicable", are left out; a video whose
    every frame is NaN scores NaN), ``min`` or ``max`` (likewise over the non-NaN frames).
    ``images (N,3,H,W)`` are scored as one-frame videos.
    """

    class Config(BaseModel):
        model_config = ConfigDict(extra="forbid")
        image_reward: ComponentSpec = Field(description="The image reward applied to each frame: {name: <registered reward>, config: {...}}.")
        frames: int | None = Field(None, ge=1, description="Frames scored per video, evenly spaced from first to last; null: every frame.")
        reduce: Literal["mean", "min", "max"] = Field("mean", description="How a video's frame scores become its score.")

    def __init__(self, config: Config | dict[str, Any] | None = None) -> None:
        from densegrpo.contracts import registry

        if config is None:
            raise UserError("video-frames needs config.image_reward, e.g. {image_reward: {name: toy-clip}}")
        self.config = config if isinstance(config, self.Config) else self.Config.model_validate(config)
        if self.config.image_reward.name == "video-frames":
            raise UserError("video-frames cannot wrap itself; set image_reward to an image reward")
        self.image_reward = registry.load("rewards", self.config.image_reward.name, self.config.image_reward.config)

    @classmethod
    def contract_instance(cls) -> "VideoFramesReward":
        """The instance the registry-wide contract tests build: toy-geneval on every frame."""
        return cls(cls.Config(image_reward=ComponentSpec(name="toy-geneval")))

    def __call__(self, videos: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None] | None = None) -> Tensor:
        """``videos (N,F,3,H,W)`` (or ``images (N,3,H,W)``) float32 in [0,1], ``N`` prompts -> ``(N,)`` float32."""
        if not isinstance(videos, Tensor) or videos.ndim not in (4, 5) or videos.shape[-3] != 3:
            raise ValueError(f"video-frames needs videos shaped (N,F,3,H,W), got {tuple(getattr(videos, 'shape', ()))}")
        if videos.ndim == 4:
            videos = videos[:, None]
        num_videos, num_frames = int(videos.shape[0]), int(videos.shape[1])
        if len(prompts) != num_videos:
            raise ValueError(f"video-frames needs one prompt per video: got {len(prompts)} prompts for {num_videos} videos")
        metadata = list(metadata) if metadata is not None else [None] * num_videos
        picked = frame_indices(num_frames, self.config.frames)
        k = len(picked)
        frames = videos[:, picked].reshape(num_videos * k, *videos.shape[2:])  # video-major: video i's frames are rows i*k .. i*k+k-1
        scores = torch.as_tensor(
            self.image_reward(frames, [p for p in prompts for _ in range(k)], [m for m in metadata for _ in range(k)])
        ).float().reshape(num_videos, k)
        return reduce_frames(scores, self.config.reduce).to(videos.device)


def reduce_frames(scores: Tensor, how: str) -> Tensor:
    """``scores (N, k)`` -> ``(N,)`` over the non-NaN frames (NaN where all are NaN)."""
    if how == "mean":
        return scores.nanmean(dim=1)
    known = ~scores.isnan()
    fill = torch.full_like(scores, float("inf") if how == "min" else float("-inf"))
    picked = torch.where(known, scores, fill)
    out = picked.amin(dim=1) if how == "min" else picked.amax(dim=1)
    return torch.where(known.any(dim=1), out, torch.full_like(out, float("nan")))


__all__ = ["VideoFramesReward", "frame_indices", "reduce_frames"]
