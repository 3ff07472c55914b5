"""Atomic, checksummed checkpoints that load without unpickling arbitrary objects.

Layout of ``RUN_DIR/checkpoints/iter-000010/``:

* ``trainable.safetensors``: the policy's trainable weights;
* ``ema.safetensors``: EMA weights (when enabled);
* ``optimizer.pt``: the optimizer state (tensors and numbers only; loaded with
  ``torch.load(weights_only=True)``);
* ``state.json``: iteration, calibrator state, counters and wall time;
* ``manifest.json``: the size and sha256 of each file above, written last.

A checkpoint is written under a temporary name and renamed into place, then
``checkpoints/latest`` (a text file naming the folder) is replaced atomically, so a crash
or a full disk never leaves a partial folder or a ``latest`` that points at one. Loading
checks every file against the manifest first and stops with one line
(:class:`~densegrpo.contracts.errors.CheckpointError`) naming the checkpoint and what is wrong;
nothing is loaded from a damaged checkpoint. :func:`load_latest` with ``fallback`` steps
back to the newest intact one instead. A checkpoint without a manifest (written before
manifests existed) loads unverified, with a note on stderr once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from densegrpo.contracts.errors import CheckpointError, UserError

LATEST = "latest"
MANIFEST = "manifest.json"
REQUIRED = ("trainable.safetensors", "optimizer.pt", "state.json")
FOLDER = re.compile(r"iter-\d{6,}")
_noted: set[str] = set()


@dataclass
class Checkpoint:
    """What a checkpoint holds, in memory."""

    trainable: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any]
    ema: dict[str, torch.Tensor] | None = None


def _note(message: str) -> None:
    """One line on stderr, once per process, from rank 0 only (every rank loads the checkpoint)."""
    if message in _noted or os.environ.get("RANK", "0") != "0":
        return
    _noted.add(message)
    print(message, file=sys.stderr, flush=True)


def _atomic_write_text(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class _Recorder(io.RawIOBase):
    """A file torch.save writes through, keeping the first ``OSError`` of a write: torch's zip
    writer turns it into a ``RuntimeError`` that no longer says what the system said."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.error = stream, None

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        try:
            return self.stream.write(data)
        except OSError as error:
            self.error = self.error or error
            raise


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)
    except SafetensorError as error:  # its Rust side reports an I/O failure as "... (os error N)"
        found = re.search(r"os error (\d+)", str(error))
        if found is None:
            raise
        code = int(found.group(1))
        raise OSError(code, os.strerror(code), str(path)) from error


def _save_pickle(value: Any, path: Path) -> None:
    with open(path, "wb") as stream:
        recorder = _Recorder(stream)
        try:
            torch.save(value, recorder)
        except RuntimeError:
            if recorder.error is None:
                raise
            raise recorder.error from None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_files(staging: Path, checkpoint: Checkpoint) -> None:
    """Every file of the checkpoint, then the manifest of their sizes and checksums, all synced."""
    writers: list[tuple[str, Callable[[Path], None]]] = [("trainable.safetensors", lambda p: _save_tensors(checkpoint.trainable, p))]
    if checkpoint.ema is not None:
        writers.append(("ema.safetensors", lambda p: _save_tensors(checkpoint.ema or {}, p)))
    writers.append(("optimizer.pt", lambda p: _save_pickle(checkpoint.optimizer, p)))
    writers.append(("state.json", lambda p: p.write_text(json.dumps(checkpoint.state, indent=2), encoding="utf-8")))
    files = {}
    for name, write in writers:
        write(staging / name)
        files[name] = {"bytes": (staging / name).stat().st_size, "sha256": _sha256(staging / name)}
    (staging / MANIFEST).write_text(json.dumps({"format": 1, "files": files}, indent=2), encoding="utf-8")
    for item in staging.iterdir():
        with open(item, "rb") as stream:
            os.fsync(stream.fileno())


def folder_for(run_dir: Path, iteration: int) -> Path:
    """``RUN_DIR/checkpoints/iter-XXXXXX``, the folder of the checkpoint after ``iteration`` iterations."""
    return Path(run_dir) / "checkpoints" / f"iter-{iteration:06d}"


def save(run_dir: Path, iteration: int, checkpoint: Checkpoint, keep: int = 2) -> Path:
    """Write ``checkpoints/iter-XXXXXX`` atomically and point ``latest`` at it.

    A failed write (a full disk: ``ENOSPC``) leaves no folder behind and ``latest`` where it
    was, and raises :class:`~densegrpo.contracts.errors.CheckpointError` with the system's message.
    """
    final = folder_for(run_dir, iteration)
    root = final.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
        try:
            _write_files(staging, checkpoint)
            if final.exists():
                shutil.rmtree(final)
            os.replace(staging, final)
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
        _atomic_write_text(root / LATEST, final.name)
    except OSError as error:
        pointer = root / LATEST
        before = f"'{pointer.read_text(encoding='utf-8').strip()}' is still the latest checkpoint" if pointer.exists() else "there is no earlier checkpoint"
        said = f"[Errno {error.errno}] {error.strerror}" if error.errno else str(error)  # the path named is a temporary one
        raise CheckpointError(
            f"could not write checkpoint '{final}': {said}; {before}; free space, then continue with --resume {run_dir}",
            final, said,
        ) from error
    _prune(root, keep, protect=final.name)
    return final


def _prune(root: Path, keep: int, protect: str) -> None:
    if keep <= 0:
        return
    folders = sorted(p for p in root.glob("iter-*") if p.is_dir())
    for old in folders[:-keep]:
        if old.name != protect:
            shutil.rmtree(old, ignore_errors=True)


def _damaged(folder: Path, problem: str) -> CheckpointError:
    run_dir = folder.parent.parent
    return CheckpointError(
        f"checkpoint '{folder}' is damaged: {problem}; nothing was loaded from it. Continue from the newest intact "
        f"checkpoint with `densegrpo train --resume {run_dir} --fallback`, or start a new run",
        folder, problem,
    )


def latest(run_dir: Path) -> Path | None:
    """The folder ``latest`` points to, or ``None`` when the run has no checkpoint.

    A pointer that names no checkpoint folder, or none beside checkpoint folders, raises
    :class:`~densegrpo.contracts.errors.CheckpointError`: a run never starts over silently when it had
    checkpoints.
    """
    root = Path(run_dir) / "checkpoints"
    pointer = root / LATEST
    if not pointer.exists():
        if any(FOLDER.fullmatch(p.name) for p in root.glob("iter-*")):
            raise _damaged(pointer, "it is missing, though the folder holds checkpoints")
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    folder = root / name
    if not FOLDER.fullmatch(name) or not folder.is_dir():
        raise _damaged(pointer, f"it names {name!r}, which is not a checkpoint folder")
    return folder


def verify(folder: Path) -> bool:
    """Check every file of ``folder`` against its manifest: ``True`` when they all match,
    ``False`` for a checkpoint without a manifest (nothing to check against); a mismatch raises
    :class:`~densegrpo.contracts.errors.CheckpointError`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise _damaged(folder, "the folder does not exist")
    if not (folder / MANIFEST).exists():
        return False
    try:
        files = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))["files"]
        entries = {str(name): (int(entry["bytes"]), str(entry["sha256"])) for name, entry in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        raise _damaged(folder, f"{MANIFEST} is unreadable") from None
    for name in REQUIRED:
        if name not in entries:
            raise _damaged(folder, f"{MANIFEST} does not list {name}")
    for name, (size, digest) in entries.items():
        path = folder / name
        if Path(name).name != name or not path.is_file():
            raise _damaged(folder, f"{name} is missing")
        actual = path.stat().st_size
        if actual != size:
            raise _damaged(folder, f"{name} has {actual} bytes where {size} were written (truncated or overwritten)")
        if _sha256(path) != digest:
            raise _damaged(folder, f"{name} does not match the sha256 written with it (edited or corrupted)")
    return True


def load(folder: Path, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Verify (:func:`verify`) and read a checkpoint folder (no arbitrary unpickling)."""
    folder = Path(folder)
    if not verify(folder):
        _note(f"note: checkpoint '{folder}' has no {MANIFEST} (written before checksums); loading it unverified")
    try:
        trainable = load_file(folder / "trainable.safetensors", device=str(map_location))
        ema_path = folder / "ema.safetensors"
        ema = load_file(ema_path, device=str(map_location)) if ema_path.exists() else None
        optimizer = torch.load(folder / "optimizer.pt", map_location=map_location, weights_only=True)
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RuntimeError, pickle.UnpicklingError, SafetensorError) as error:
        raise _damaged(folder, f"unreadable ({' '.join(str(error).split())})") from None
    return Checkpoint(trainable=trainable, optimizer=optimizer, state=state, ema=ema)


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu", fallback: bool = False) -> tuple[Path, Checkpoint] | None:
    """The latest checkpoint of ``run_dir`` and its folder, or ``None`` when it has none.

    A damaged latest checkpoint raises :class:`~densegrpo.contracts.errors.CheckpointError`; with
    ``fallback``, the newest intact checkpoint is loaded instead and a line on stderr names
    what was skipped and why.
    """
    try:
        folder = latest(run_dir)
        return None if folder is None else (folder, load(folder, map_location))
    except CheckpointError as error:
        if not fallback:
            raise
        bad, skipped = {Path(str(error.folder))}, [f"'{error.folder}' ({error.problem})"]
    root = Path(run_dir) / "checkpoints"
    for folder in sorted((p for p in root.glob("iter-*") if FOLDER.fullmatch(p.name) and p.is_dir()), reverse=True):
        if folder in bad:
            continue
        try:
            saved = load(folder, map_location)
        except CheckpointError as error:
            skipped.append(f"'{folder}' ({error.problem})")
            continue
        _note(f"note: --fallback: skipped damaged {', '.join(skipped)}; continuing from '{folder}'")
        return folder, saved
    raise UserError(f"no intact checkpoint in '{root}' to fall back to (damaged: {', '.join(skipped)}); start a new run")
