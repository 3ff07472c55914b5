"""Prompt groups and their noise for one iteration, seeded so every run (and every world
size) draws the same global batch."""

from __future__ import annotations

from typing import Any

import numpy as np

from densegrpo.method.batch import Batch
from densegrpo.method.distributed import World
from densegrpo.method.noise import draw_noise

TRAIN_STREAM, CALIBRATION_STREAM = 1, 2
"""Random streams of the training iterations and of the calibration rounds."""


def prompt_metadata(record: dict[str, Any]) -> dict[str, Any] | None:
    """A prompt record's GenEval metadata: the record itself when it says what to ``include``."""
    return record if "include" in record else None


class PromptBatches:
    """Draws batches of prompt groups from ``records``, seeded by ``(seed, stream, index)``.

    ``latent_shape`` ``(C, h, w)`` and ``num_steps`` ``T`` size the noise; ``world`` says
    which rows of the global batch are this rank's.
    """

    def __init__(self, records: list[dict[str, Any]], seed: int, world: World, latent_shape: tuple[int, int, int], num_steps: int):
        self.records = records
        self.seed = seed
        self.world = world
        self.latent_shape = tuple(latent_shape)
        self.num_steps = num_steps

    def draw(self, index: int, stream: int, groups: int, group_size: int, same_noise: bool) -> Batch:
        """``groups`` prompt groups of ``group_size`` for iteration (or round) ``index``, this rank's shard.

        ``same_noise``: every member of a group starts from the same initial noise.
        """
        rng = np.random.default_rng([self.seed, stream, index])
        picks = rng.choice(len(self.records), size=groups, replace=len(self.records) < groups)
        records = [self.records[int(i)] for i in picks for _ in range(group_size)]
        total = len(records)
        shard = self.world.shard(total)
        indices = list(range(total))[shard]
        noise, step_noise = draw_noise(
            self.seed,
            index,
            indices,
            self.latent_shape,
            self.num_steps,
            group_size=group_size if same_noise else None,
            stream=stream,
        )
        local = records[shard]
        return Batch(
            prompts=[r["prompt"] for r in local],
            metadata=[prompt_metadata(r) for r in local],
            noise=noise,
            step_noise=step_noise,
            global_size=total,
        )
