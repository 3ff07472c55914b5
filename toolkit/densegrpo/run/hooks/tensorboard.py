"""TensorBoard scalars of every metrics record under ``RUN/tensorboard`` (``logging.tensorboard``)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from densegrpo.contracts.errors import UserError

if TYPE_CHECKING:
    from densegrpo.run.state import Run


def open_tensorboard(run_dir: Path, purge_step: int | None = None) -> Any:
    """A TensorBoard ``SummaryWriter`` on ``run_dir/tensorboard``; ``purge_step`` (the iteration a
    resumed run starts at) drops the events a killed run wrote after its last checkpoint."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise UserError(
            "logging.tensorboard=true needs the tensorboard package: pip install 'densegrpo[tensorboard]' "
            "(or set logging.tensorboard=false)"
        ) from error
    return SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"), purge_step=purge_step or None)


def write_scalars(board: Any, record: dict[str, Any]) -> None:
    """One iteration's metrics as TensorBoard scalars at step ``iteration``: numbers as they
    are, per-step lists (``noise_level``, ``dense_gain_mean``, ...) as ``name/k<step>``."""
    step = int(record["iteration"])
    for key, value in record.items():
        if key == "iteration":
            continue
        values = value if isinstance(value, list) else [value]
        for k, item in enumerate(values):
            if isinstance(item, bool) or not isinstance(item, (int, float)) or not math.isfinite(item):
                continue
            board.add_scalar(f"{key}/k{k}" if isinstance(value, list) else key, item, step)
    board.flush()


class TensorBoardHook:
    """Rank 0 writes every record's scalars; a resumed run purges the events past its checkpoint."""

    def __init__(self) -> None:
        self.board: Any = None

    def before_training(self, run: "Run") -> None:
        if run.world.is_main:
            self.board = open_tensorboard(run.run_dir, purge_step=run.iteration)

    def after_iteration(self, run: "Run", record: dict[str, Any]) -> None:
        if self.board is not None:
            write_scalars(self.board, record)

    def after_training(self, run: "Run", summary: dict[str, Any]) -> None:
        if self.board is not None:
            self.board.close()
