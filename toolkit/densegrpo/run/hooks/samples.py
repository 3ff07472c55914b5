"""PNG grids of ODE samples of the first test prompts, before training and every
``logging.sample_every`` iterations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from densegrpo.run.hooks.evaluation import eval_images
from densegrpo.run.images import make_grid, save_png

if TYPE_CHECKING:
    from densegrpo.run.state import Run


def write_samples(run: "Run") -> None:
    """``samples/iter-<run.iteration>.png``: ``logging.sample_prompts`` test prompts (0: none)."""
    count = run.config.logging.sample_prompts
    if count == 0 or not run.shares_rank0_work:
        return
    prompts = [r["prompt"] for r in run.test_records[:count]]
    images = eval_images(run, prompts)
    if run.world.is_main:
        save_png(make_grid(images, prompts), run.run_dir / "samples" / f"iter-{run.iteration:06d}.png")


class SampleGridHook:
    """Writes a grid before a fresh run's first iteration and whenever the evaluation runs."""

    def before_training(self, run: "Run") -> None:
        if run.iteration == 0:
            write_samples(run)

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        if run.due(run.config.logging.sample_every):
            write_samples(run)

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        pass
