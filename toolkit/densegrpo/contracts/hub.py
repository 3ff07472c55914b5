"""Weight loading for reward plugins: local folders, the Hugging Face cache, then the hub.

Shared by the plugins under ``plugins/`` so that each finds weights, reports missing ones and
loads state dicts the same way:

* the hub is offline when a config flag or ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` says so;
* cached hub files are read with ``local_files_only=True`` first, so they never touch the network;
* before a download the hub is probed with a short timeout, so an unreachable hub fails in
  seconds instead of after a minute of retries;
* every failure to find weights is one :class:`WeightsNotFoundError` line that names the weights
  and says how to point at local files;
* state dicts load with safetensors or ``torch.load(weights_only=True)`` (no pickled code).

Nothing here imports transformers or huggingface_hub at module import time.
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from typing import Any, Callable, Literal
from urllib.parse import urlparse

import torch
from torch import Tensor

from densegrpo.contracts.errors import UserError

Dtype = Literal["float32", "float16", "bfloat16"]
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_TRUE = {"1", "true", "yes", "on"}
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNPICKLER = re.compile(r"WeightsUnpickler error: ([^\n]+)")


class WeightsNotFoundError(UserError, OSError):
    """Weights that are neither a local file or folder nor reachable on the hub."""


class CheckpointLoadError(UserError):
    """A checkpoint that ``torch.load(weights_only=True)`` refuses."""


def hub_offline(flag: bool = False) -> bool:
    """True when ``flag`` (a config's ``offline``) or HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE says offline."""
    env = (os.environ.get(name, "").strip().lower() for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return flag or any(value in _TRUE for value in env)


def probe_hub(repo_id: str) -> None:
    """Raise within seconds when ``repo_id``'s hub is unreachable (download retries can take a minute)."""
    from huggingface_hub import HfApi

    HfApi().model_info(repo_id, timeout=10)


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub is not offline and its endpoint (HF_ENDPOINT) accepts a TCP connection in ``timeout_s``."""
    if hub_offline():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks CUDA when available, else the CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    """``"float32" | "float16" | "bfloat16"`` -> the torch dtype."""
    return _DTYPES[dtype]


def one_line(error: BaseException, limit: int = 300) -> str:
    """``"TypeName: message"`` on one line, cut to ``limit`` characters of message."""
    text = " ".join(_ANSI.sub("", str(error)).split())
    return f"{type(error).__name__}: {text[:limit]}"


def is_repo_id(source: str) -> bool:
    """Whether ``source`` has the shape of a hub repo id (``name`` or ``owner/name``)."""
    return bool(_REPO_ID.match(source))


def is_local(path: str) -> bool:
    """Whether ``path`` (``~`` expanded) exists on disk, so it is not a hub repo id."""
    return Path(path).expanduser().exists()


def cached_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of hub repo ``repo_id`` from the local cache, or ``None`` (never downloads)."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:
        return None


def load_pretrained(load: Callable[..., Any], source: str, *, what: str, field: str, offline: bool) -> Any:
    """``load(source, local_files_only=...)`` from a local folder, the cache, then the hub.

    Args:
        load: a ``from_pretrained``-like callable.
        source: a local folder or a hub repo id.
        what: the weights' name in messages (``"PickScore model"``).
        field: the config field that holds ``source``, named in messages.
        offline: the config's ``offline`` flag (the environment can also say offline).

    Raises:
        WeightsNotFoundError: one line that names the weights and how to point at them.
    """
    path = Path(source).expanduser()
    if path.exists():
        return load(str(path), local_files_only=True)
    if not is_repo_id(source):
        raise WeightsNotFoundError(
            f"{what} folder '{source}' does not exist; set the reward's `{field}` to a folder saved "
            "with save_pretrained or to a Hugging Face hub id"
        )
    try:
        return load(source, local_files_only=True)
    except OSError as error:
        if hub_offline(offline):
            raise WeightsNotFoundError(
                f"{what} '{source}' is not in the local Hugging Face cache and the hub is "
                f"offline; run `hf download {source}` where there is network, or set the reward's "
                f"`{field}` to a local folder"
            ) from error
    try:
        probe_hub(source)
        return load(source, local_files_only=False)
    except Exception as error:  # network, auth and missing-repo errors all end here
        raise WeightsNotFoundError(
            f"{what} '{source}' could not be downloaded ({one_line(error)}); run "
            f"`hf download {source}` where there is network, or set the reward's `{field}` to a local folder"
        ) from error


def hub_file(
    source: str,
    filename: str,
    *,
    what: str,
    field: str,
    offline: bool,
    noun: str = "file",
    local_file: str = "a local file",
) -> str:
    """Path of ``filename``: ``source`` itself when a file, in ``source`` when a folder, else a hub repo's.

    Args:
        source: a local file, a local folder or a hub repo id.
        filename: the file to find in a folder or hub repo.
        what: the weights' name in messages (``"aesthetic MLP"``).
        field: the config field that holds ``source``, named in messages.
        offline: the config's ``offline`` flag (the environment can also say offline).
        noun: what the file is called in messages (``"file"``, ``"checkpoint"``).
        local_file: what ``field`` may be set to, in messages (``"a local .pt file"``).

    Raises:
        WeightsNotFoundError: one line that names the weights and how to point at them.
    """
    path = Path(source).expanduser()
    if path.is_file():
        return str(path)
    if path.is_dir():
        if (path / filename).is_file():
            return str(path / filename)
        raise WeightsNotFoundError(
            f"{what} {noun} '{filename}' is not in folder '{source}'; set the reward's `{field}` to the file itself"
        )
    if not is_repo_id(source):
        raise WeightsNotFoundError(
            f"{what} {noun} '{source}' does not exist; set the reward's `{field}` to {local_file} or a hub repo id"
        )
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(source, filename, local_files_only=True)
    except OSError as error:
        if hub_offline(offline):
            raise WeightsNotFoundError(
                f"{what} weights '{source}/{filename}' are not in the local Hugging Face cache and the hub "
                f"is offline; run `hf download {source} {filename}` where there is network, or set the "
                f"reward's `{field}` to a local file"
            ) from error
    try:
        probe_hub(source)
        return hf_hub_download(source, filename)
    except Exception as error:
        raise WeightsNotFoundError(
            f"{what} weights '{source}/{filename}' could not be downloaded ({one_line(error)}); run "
            f"`hf download {source} {filename}` where there is network, or set the reward's `{field}` to a local file"
        ) from error


def load_state_dict(
    path: str | os.PathLike[str],
    *,
    allow_pickle: bool = False,
    fix: str = "convert it to .safetensors",
    error: type[Exception] = CheckpointLoadError,
) -> dict[str, Tensor]:
    """A state dict from a ``.safetensors`` file or ``torch.load(weights_only=True)``.

    A ``{"state_dict": ...}`` wrapper is unwrapped and DistributedDataParallel's ``module.``
    key prefix removed. Full unpickling (which can run code) happens only with ``allow_pickle``.

    Raises:
        error: (default :class:`CheckpointLoadError`) one line when ``weights_only`` refuses the
            file and ``allow_pickle`` is off; ``fix`` ends the line and says what to do.
    """
    path = str(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state: Any = load_file(path)
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as refused:
            if not allow_pickle:
                # torch's message is a long how-to; its WeightsUnpickler line names the refused global
                found = _UNPICKLER.search(str(refused))
                reason = f"{type(refused).__name__}: {found.group(1).strip()}" if found else one_line(refused)
                raise error(f"torch.load(weights_only=True) refused '{path}' ({reason}); {fix}") from refused
            state = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    # checkpoints saved from DistributedDataParallel prefix every key with "module."
    return {(k[7:] if k.startswith("module.") else k): v for k, v in state.items()}
