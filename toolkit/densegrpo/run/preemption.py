"""Stopping a training run cleanly at SIGTERM or SIGINT (a scheduler's preemption, Ctrl-C).

While :class:`Preemption` is entered, the first SIGTERM or SIGINT only records itself: the
training loop finishes the iteration under way (its metrics line and hooks included), writes
a checkpoint and raises :class:`Preempted`, which the CLI turns into one line and exit status
128 + the signal's number (143 for SIGTERM, 130 for SIGINT). Finishing the iteration rather
than abandoning it keeps the resumed run bit-identical to an uninterrupted one: every
iteration draws its prompts and noise from its own index, so the checkpoint after iteration
``k`` is all a resume needs. A second signal while stopping raises :class:`Aborted` at once,
with no new checkpoint (the latest one stays intact: checkpoints are written atomically).

Under a launcher every rank receives the signal, maybe at different iterations; the ranks
agree on the largest signal number seen (one all-reduce per iteration) so they stop after
the same iteration. Handlers are installed only in the main thread (Python delivers signals
there alone) and the previous ones are restored on exit.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from densegrpo.method.distributed import World

SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_status(signal_number: int) -> int:
    """The shell's status for a process ended by ``signal_number``: 143 (SIGTERM), 130 (SIGINT)."""
    return 128 + signal_number


def resume_hint(run_dir: Path) -> str:
    return f"resume with `densegrpo train --resume {run_dir}`"


class Preempted(Exception):
    """A signal stopped the run after ``iterations`` of ``total`` iterations.

    Attributes:
        signal_number: the signal (``signal.SIGTERM`` or ``signal.SIGINT``).
        exit_status: what the CLI exits with, :func:`exit_status` of the signal.
        checkpoint: the checkpoint folder holding those iterations (``None`` before the first).
        summary: the run's summary dict, as ``run_training`` returns it, with ``stopped_by``.
    """

    def __init__(self, signal_number: int, run_dir: Path, iterations: int, total: int,
                 checkpoint: Path | None, written: bool, summary: dict[str, Any]) -> None:
        name = signal.Signals(signal_number).name
        if checkpoint is None:
            done = f"stopped by {name} before the first iteration; nothing to checkpoint; {resume_hint(run_dir)} to start it"
        else:
            saved = f"checkpoint written to '{checkpoint}'" if written else f"its checkpoint '{checkpoint}' was already written"
            done = f"stopped by {name} after {iterations} of {total} iterations; {saved}; {resume_hint(run_dir)}"
        super().__init__(f"densegrpo: {done}")
        self.signal_number = signal_number
        self.exit_status = exit_status(signal_number)
        self.checkpoint = checkpoint
        self.summary = summary


class Aborted(KeyboardInterrupt):
    """A second signal while the run was stopping: it stops at once, without a new checkpoint.

    A ``KeyboardInterrupt`` so that no ``except Exception`` on the way swallows it, while
    ``finally`` blocks (the checkpoint's staging folder, the run-folder lock) still run.
    """

    def __init__(self, signal_number: int, run_dir: Path) -> None:
        name = signal.Signals(signal_number).name
        super().__init__(
            f"densegrpo: second {name} while stopping; stopped at once without a new checkpoint; "
            f"{resume_hint(run_dir)} (from its latest checkpoint)"
        )
        self.signal_number = signal_number
        self.exit_status = exit_status(signal_number)

    def __str__(self) -> str:
        return str(self.args[0])


class Preemption:
    """Context manager: records the first SIGTERM/SIGINT for the loop to act on (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.getsignal(number)
                signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, previous in self._previous.items():
            # None: the previous handler was not installed from Python; the default is the best guess
            signal.signal(number, signal.SIG_DFL if previous is None else previous)
        self._previous.clear()

    def _handle(self, signal_number: int, frame: FrameType | None) -> None:
        if self.received is not None:
            raise Aborted(signal_number, self.run_dir)
        self.received = signal_number

    def requested(self, world: "World") -> bool:
        """Whether any rank received a signal; every rank must call it at the same point.

        A rank that received none takes the largest signal number seen, so every rank
        exits with the same status.
        """
        agreed = int(world.max(float(self.received or 0)))
        if agreed and self.received is None:
            self.received = agreed
        return bool(agreed)
