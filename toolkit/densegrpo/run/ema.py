"""An exponential moving average of the trainable weights, used for evaluation."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import Tensor


class WeightAverage:
    """``ema <- decay * ema + (1 - decay) * weights`` after every iteration.

    ``state`` maps each trainable weight's name to its average (what checkpoints keep).
    """

    def __init__(self, policy: Any, decay: float):
        self.decay = decay
        self.state: dict[str, Tensor] = {k: v.detach().clone() for k, v in policy.trainable_state_dict().items()}

    def update(self, policy: Any) -> None:
        with torch.no_grad():
            for name, value in policy.trainable_state_dict().items():
                self.state[name].mul_(self.decay).add_(value.detach(), alpha=1 - self.decay)

    def load(self, state: dict[str, Tensor]) -> None:
        self.state = {k: v.clone() for k, v in state.items()}

    @contextmanager
    def swapped_in(self, policy: Any) -> Iterator[None]:
        """The policy carries the averaged weights inside the context, its trained ones after."""
        saved = {k: v.detach().clone() for k, v in policy.trainable_state_dict().items()}
        policy.load_trainable_state_dict(self.state)
        try:
            yield
        finally:
            policy.load_trainable_state_dict(saved)
