"""Run folders: the saved config, the policy restored from a checkpoint, default locations."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock; runs there are not locked
    fcntl = None  # type: ignore[assignment]

import yaml

from densegrpo.contracts import config as cfg
from densegrpo.contracts.errors import UserError
from densegrpo.run import checkpoint as ckpt
from densegrpo.run.build import build_policy

CONFIG_FILE = cfg.RUN_CONFIG
LOCK_FILE = ".lock"


def default_run_dir(prefix: str = "") -> Path:
    return Path("runs") / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


def is_run_dir(path: Path | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / CONFIG_FILE).exists()


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> cfg.RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not Path(run_dir).exists():
        raise UserError(f"run folder '{run_dir}' does not exist; pass the folder `densegrpo train --out` wrote")
    if not Path(run_dir).is_dir():
        raise UserError(f"'{run_dir}' is a file, not a run folder; pass the folder `densegrpo train --out` wrote")
    if not path.exists():
        raise UserError(f"'{run_dir}' is not a run folder (no {CONFIG_FILE}); pass the folder `densegrpo train --out` wrote")
    return cfg.resolve(path, overrides)


def save_run_config(run_dir: Path, config: cfg.RunConfig) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


@contextmanager
def writer_lock(run_dir: Path) -> Iterator[None]:
    """Hold an OS lock on ``RUN_DIR/.lock`` (``fcntl.flock``) while this process writes the run.

    A second writer gets a :class:`~densegrpo.contracts.errors.UserError` naming the holder's pid, before
    it touches anything. The kernel drops the lock when the holder's process ends, however it
    ends (SIGKILL included), so no stale lock is left to clean up; the file itself stays. A
    folder this call made, and in which nothing but the lock was written when the body fails
    (a bad prompt file, an unknown component), is removed again.
    """
    folder = Path(run_dir)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot make run folder '{run_dir}': it or a folder above it is a file; choose another --out") from None
    except OSError as error:
        raise UserError(f"cannot make run folder '{run_dir}': {error.strerror or error}; choose another --out") from None
    with open(folder / LOCK_FILE, "a+", encoding="utf-8") as handle:
        if fcntl is not None:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise UserError(
                    f"'{run_dir}' is in use: another process (pid {holder}) is training into it; "
                    "wait for it to finish or stop it, or choose another --out"
                ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        except BaseException:
            if created and [p.name for p in folder.iterdir()] == [LOCK_FILE]:
                _remove_empty(folder)
            raise


def _remove_empty(folder: Path) -> None:
    """Remove a run folder that holds only its lock file (the lock is still held: no one else
    can have written into it)."""
    try:
        (folder / LOCK_FILE).unlink()
        folder.rmdir()
    except OSError:
        pass  # someone else's file appeared meanwhile: leave the folder


def config_or_run(target: Path | None, overrides: list[str] | None = None) -> tuple[cfg.RunConfig, Path | None]:
    """A CONFIG file, a RUN_DIR, or nothing (the default config)."""
    if target is not None and Path(target).is_dir():
        return load_run_config(Path(target), overrides), Path(target)
    return cfg.resolve(target, overrides), None


def load_policy(config: cfg.RunConfig, run_dir: Path | None = None, use_ema: bool = True) -> Any:
    """Build the configured policy; from a run folder, restore its latest trained weights."""
    folder = ckpt.latest(run_dir) if run_dir is not None else None
    if run_dir is not None and folder is None:  # before the weights load
        raise UserError(f"run folder '{run_dir}' has no checkpoint yet; train longer or pass its config instead")
    policy = build_policy(config)
    if folder is not None:
        saved = ckpt.load(folder, map_location=policy.device)
        weights = saved.ema if (use_ema and saved.ema is not None) else saved.trainable
        policy.load_trainable_state_dict(weights)
    return policy
