"""Atomic checkpoints that load without unpickling arbitrary objects.

Layout of ``RUN_DIR/checkpoints/iter-000010/``:

* ``trainable.safetensors``: the policy's trainable weights;
* ``ema.safetensors``: EMA weights (when enabled);
* ``optimizer.pt``: the optimizer state (tensors and numbers only; loaded with
  ``torch.load(weights_only=True)``);
* ``state.json``: iteration, calibrator state, counters and wall time.

A checkpoint is written under a temporary name and renamed into place, then
``checkpoints/latest`` (a text file naming the folder) is replaced atomically, so a crash
never leaves a corrupt latest checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from densegrpo.errors import UserError

LATEST = "latest"


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def _atomic_write_text(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(handle, "w", encoding="utf-8") as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(tmp, path)


def save(run_dir: Path, iteration: int, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write ``checkpoints/iter-XXXXXX`` atomically and point ``latest`` at it."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"iter-{iteration:06d}"
    staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in checkpoint.trainable.items()}, staging / "trainable.safetensors")
        if checkpoint.ema is not None:
            save_file({k: v.detach().cpu().contiguous() for k, v in checkpoint.ema.items()}, staging / "ema.safetensors")
        torch.save(checkpoint.optimizer, staging / "optimizer.pt")
        (staging / "state.json").write_text(json.dumps(checkpoint.state, indent=2), encoding="utf-8")
        for item in staging.iterdir():
            with open(item, "rb") as stream:
                os.fsync(stream.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _atomic_write_text(root / LATEST, final.name)
    _prune(root, keep, protect=final.name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    folders = sorted(p for p in root.glob("iter-*") if p.is_dir())
    for old in folders[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def latest(run_dir: Path) -> Path | None:
    """The folder ``latest`` points to, or ``None`` when the run has no checkpoint."""
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.exists():
        return None
    folder = root / pointer.read_text(encoding="utf-8").strip()
    return folder if folder.is_dir() else None


def load(folder: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Read a checkpoint folder (no arbitrary unpickling)."""
    folder = Path(folder)
    try:
        trainable = load_file(folder / "trainable.safetensors", device=str(map_location))
        ema_path = folder / "ema.safetensors"
        ema = load_file(ema_path, device=str(map_location)) if ema_path.exists() else None
        optimizer = torch.load(folder / "optimizer.pt", map_location=map_location, weights_only=True)
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"checkpoint '{folder}' is unreadable ({error}); resume from another run folder") from None
    return Checkpoint(trainable=trainable, optimizer=optimizer, state=state, ema=ema)
