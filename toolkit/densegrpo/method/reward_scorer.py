"""Scores decoded images of a batch with the run's weighted rewards."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from densegrpo.contracts.errors import UserError

MESSAGE_CHARS = 300


@dataclass
class WeightedReward:
    """A loaded reward model with its name and weight in a multi-reward sum."""

    name: str
    weight: float
    model: Any


class RewardScorer:
    """Binds each image to its sample's prompt and metadata and scores it with every reward.

    ``scorer(images (M,3,H,W), rows (M,))`` returns the raw scores ``(M, R)``, one column per
    reward, in the order of ``rewards``; :meth:`combine` turns them into the weighted sum
    (Flow-GRPO's multi-reward). ``rows[j]`` is the sample image ``j`` belongs to. NaN from a
    reward stays NaN ("not applicable"). ``calls`` counts the images scored. A reward that
    raises, or returns anything but one finite-or-NaN float per image, stops the run with one
    line naming it (:func:`score_one`).
    """

    def __init__(self, rewards: list[WeightedReward], prompts: list[str], metadata: list[dict[str, Any] | None]):
        self.rewards = rewards
        self.prompts = prompts
        self.metadata = metadata
        self.weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)
        self.calls = 0

    def __call__(self, images: Tensor, rows: Tensor) -> Tensor:
        """``(M, R)`` raw scores of each reward."""
        index = rows.tolist()
        prompts = [self.prompts[i] for i in index]
        metadata = [self.metadata[i] for i in index]
        self.calls += int(images.shape[0])
        pixels = images.float()
        return torch.stack([score_one(r, pixels, prompts, metadata) for r in self.rewards], dim=1)

    def combine(self, raw: Tensor) -> Tensor:
        """Weighted sum over the reward axis ``(..., R) -> (...)``."""
        return (raw * self.weights).sum(dim=-1)

    def weighted(self, images: Tensor, rows: Tensor) -> Tensor:
        """``(M,)``: the weighted sum of the rewards of each image."""
        return self.combine(self(images, rows))


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if len(text) <= MESSAGE_CHARS else text[: MESSAGE_CHARS - 3] + "..."


def score_one(reward: WeightedReward, images: Tensor, prompts: list[str], metadata: list[dict[str, Any] | None]) -> Tensor:
    """``(M,)`` float32 CPU scores of ``reward`` for ``images (M,3,H,W)``.

    Raises :class:`~densegrpo.contracts.errors.UserError` naming the reward when it raises (the
    original exception is the ``__cause__``) or returns anything but a floating-point ``(M,)``
    tensor on the images' device or the CPU with no infinity. NaN passes: "not applicable".
    """
    try:
        scores = reward.model(images, prompts, metadata)
    except Exception as error:
        kind = "" if isinstance(error, UserError) else f" raised {type(error).__name__}"
        raise UserError(f"reward '{reward.name}'{kind}: {_one_line(error) or type(error).__name__}") from error
    problem = wrong_scores(scores, images)
    if problem:
        raise UserError(f"reward '{reward.name}' returned {problem}")
    return scores.float().cpu()


def wrong_scores(scores: Any, images: Tensor) -> str:
    """What is wrong with a reward's ``scores`` for ``images``, in words, or ``""``."""
    count = int(images.shape[0])
    expect = f"a reward returns one float per image, a ({count},) tensor"
    if not isinstance(scores, Tensor):
        return f"a {type(scores).__name__}, not a tensor; {expect}"
    if not scores.dtype.is_floating_point:
        return f"dtype {scores.dtype}; {expect} of floats (float32)"
    if tuple(scores.shape) != (count,):
        return f"shape {tuple(scores.shape)} for {count} images; {expect}"
    if scores.device not in (images.device, torch.device("cpu")):
        return f"a tensor on {scores.device}; return it on the images' device ({images.device}) or the CPU"
    infinite = torch.isinf(scores.detach()).nonzero().flatten().tolist()
    if infinite:
        first = infinite[0]
        return (f"{float(scores[first])} for {len(infinite)} of {count} images (first: image {first}); "
                "return a finite score, or NaN for 'not applicable'")
    return ""
