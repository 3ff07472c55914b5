"""A progress bar over the run's iterations (``logging.progress``), on rank 0."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm

if TYPE_CHECKING:
    from densegrpo.run.state import Run


class ProgressHook:
    """tqdm bar with the last iteration's reward and NFE."""

    def __init__(self) -> None:
        self.bar: Any = None

    def before_training(self, run: "Run") -> None:
        self.bar = tqdm(
            total=run.config.iterations,
            initial=run.iteration,
            desc="GRPO",
            unit="it",
            disable=not (run.config.logging.progress and run.world.is_main),
            dynamic_ncols=True,
        )

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        self.bar.update(1)
        self.bar.set_postfix(reward=f"{record['reward_mean']:.3f}", nfe=record["nfe"])

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        self.bar.close()
