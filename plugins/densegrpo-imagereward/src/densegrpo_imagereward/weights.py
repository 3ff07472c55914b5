"""Find weight files in a local folder or a Hugging Face hub repo, never hanging on the network.

A ``model_path`` is a local folder (or file) when it exists on disk, else a hub repo id. Hub files
come from the local cache first; a download is tried only when ``HF_HUB_OFFLINE`` is unset and the
hub answers a 3-second TCP probe, so an offline machine fails at once with one line that names the
missing file and how to point at it.
"""

from __future__ import annotations

from pathlib import Path

from densegrpo.api import hub_reachable, is_local

from densegrpo_imagereward.errors import MissingWeightsError


def resolve_file(model_path: str, filename: str, what: str, hint: str) -> Path:
    """Path of ``filename`` inside local folder ``model_path`` or hub repo ``model_path``.

    Raises:
        MissingWeightsError: one line naming ``what`` is missing and how to point at it (``hint``).
    """
    local = Path(model_path).expanduser()
    if local.is_dir():
        candidate = local / filename
        if candidate.is_file():
            return candidate
        raise MissingWeightsError(f"{what}: {candidate} does not exist; {hint}")
    if local.is_file():
        return local
    if model_path.startswith((".", "/", "~")) or model_path.count("/") > 1:
        raise MissingWeightsError(f"{what}: local path {model_path} does not exist; {hint}")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(model_path, filename, local_files_only=True))
    except Exception:  # not cached (or not a valid repo id): fall through to the download check
        pass
    if not hub_reachable():
        raise MissingWeightsError(
            f"{what}: {filename} from hub repo {model_path} is not in the local Hugging Face cache and the "
            f"hub is offline; {hint}"
        )
    try:
        return Path(hf_hub_download(model_path, filename, etag_timeout=10))
    except Exception as error:
        raise MissingWeightsError(
            f"{what}: could not download {filename} from hub repo {model_path} ({type(error).__name__}); {hint}"
        ) from None


def local_or_cached(model_path: str) -> tuple[str, bool]:
    """``(path_or_id, local_files_only)`` for ``from_pretrained`` calls that must not hang."""
    if is_local(model_path):
        return str(Path(model_path).expanduser()), True
    return model_path, not hub_reachable()
