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

from densegrpo import checkpoint as ckpt
from densegrpo import config as cfg
from densegrpo.build import build_policy
from densegrpo.errors import UserError

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"


def default_run_dir(prefix: str = "") -> Path:
    return Path("runs") / f"{prefix}{time.strftime('%Y%m%d-%H%M%S')}"


def is_run_dir(path: Path | None) -> bool:
    return path is not None and Path(path).is_dir() and (Path(path) / CONFIG_FILE).exists()


def load_run_config(run_dir: Path, overrides: list[str] | None = None) -> cfg.RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.exists():
        raise UserError(f"'{run_dir}' is not a run folder (no {CONFIG_FILE}); pass the folder `densegrpo train --out` wrote")
    return cfg.resolve(path, overrides)


def save_run_config(run_dir: Path, config: cfg.RunConfig) -> None:
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / CONFIG_FILE).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), encoding="utf-8")


@contextmanager
def writer_lock(run_dir: Path) -> Iterator[None]:
    """Hold an OS lock on ``RUN_DIR/.lock`` (``fcntl.flock``) while this process writes the run.

    A second writer gets a :class:`~densegrpo.errors.UserError` naming the holder's pid, before
    it touches anything. The kernel drops the lock when the holder's process ends, however it
    ends (SIGKILL included), so no stale lock is left to clean up; the file itself stays.
    """
    folder = Path(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
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
        yield


def config_or_run(target: Path | None, overrides: list[str] | None = None) -> tuple[cfg.RunConfig, Path | None]:
    """A CONFIG file, a RUN_DIR, or nothing (the default config)."""
    if target is not None and Path(target).is_dir():
        return load_run_config(Path(target), overrides), Path(target)
    return cfg.resolve(target, overrides), None


def load_policy(config: cfg.RunConfig, run_dir: Path | None = None, use_ema: bool = True) -> Any:
    """Build the configured policy; from a run folder, restore its latest trained weights."""
    policy = build_policy(config)
    if run_dir is not None:
        folder = ckpt.latest(run_dir)
        if folder is None:
            raise UserError(f"run folder '{run_dir}' has no checkpoint yet; train longer or pass its config instead")
        saved = ckpt.load(folder, map_location=policy.device)
        weights = saved.ema if (use_ema and saved.ema is not None) else saved.trainable
        policy.load_trainable_state_dict(weights)
    return policy
