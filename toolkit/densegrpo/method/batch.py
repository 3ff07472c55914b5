"""The input of one GRPO iteration: a rank's share of the prompt groups and their noise."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor


@dataclass
class Batch:
    """One rank's share of a global batch. Rows are samples; groups are contiguous globally.

    Attributes:
        prompts: ``n`` prompt strings (the rank's rows).
        metadata: ``n`` GenEval-style metadata dicts (or ``None``).
        noise: ``(n, C, h, w)`` initial noise.
        step_noise: ``(n, T, C, h, w)`` per-step Gaussian draws.
        global_size: ``N``, samples in the whole batch over all ranks.
    """

    prompts: list[str]
    metadata: list[dict[str, Any] | None]
    noise: Tensor
    step_noise: Tensor
    global_size: int
