"""GenEval metadata: one JSON object per line, ``{"tag", "include", "exclude"?, "prompt"}``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from densegrpo_geneval.errors import MetadataError


def read_metadata_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """Every line of a GenEval ``evaluation_metadata.jsonl`` (blank lines skipped)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MetadataError(f"GenEval metadata file {path} does not exist; set metadata_file to a JSONL file")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise MetadataError(f"{path}:{number} is not valid JSON ({error.msg}); fix that line") from None
        if not isinstance(record, dict) or "include" not in record:
            raise MetadataError(f"{path}:{number} has no 'include' list; each line must be a GenEval metadata object")
        records.append(record)
    return records


def metadata_by_prompt(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{prompt: metadata}`` from a GenEval JSONL file (lines without a prompt are skipped)."""
    return {record["prompt"]: record for record in read_metadata_jsonl(path) if "prompt" in record}
