"""Resolve hub ids or local paths without ever hanging on an unreachable hub.

Local paths are used as they are. Hub ids are read from the local Hugging Face cache first; a
download is tried only when ``HF_HUB_OFFLINE`` is unset and the hub answers a 3-second TCP probe.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

_TRUE = {"1", "true", "yes", "on"}


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set."""
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout_s: float = 3.0) -> bool:
    """Whether the hub endpoint accepts a TCP connection within ``timeout_s``."""
    if hub_offline():
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname or "", port), timeout=timeout_s):
            return True
    except OSError:
        return False


def is_local(path: str) -> bool:
    return Path(path).expanduser().exists()


def cached_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of hub repo ``repo_id`` from the local cache, or ``None``."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:
        return None
