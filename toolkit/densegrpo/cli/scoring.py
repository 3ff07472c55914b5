"""``densegrpo score``: score image files with a reward model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from densegrpo.contracts import registry
from densegrpo.contracts.config import parse_override
from densegrpo.contracts.errors import UserError
from densegrpo.run.images import load_images


def parse_metadata(text: str | None, count: int) -> list[dict[str, Any] | None]:
    """A JSON object (for every image), a JSON list (one per image) or a .json/.jsonl file."""
    if text is None:
        return [None] * count
    path = Path(text)
    if path.suffix in {".json", ".jsonl"} and not path.is_file():
        raise UserError(f"--metadata file '{path}' does not exist; check the path, or pass the JSON itself")
    try:
        if path.suffix in {".json", ".jsonl"} and path.is_file():
            raw = path.read_text(encoding="utf-8")
            data: Any = [json.loads(line) for line in raw.splitlines() if line.strip()] if path.suffix == ".jsonl" else json.loads(raw)
        else:
            data = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(f"--metadata is not valid JSON ({error.msg} at position {error.pos}); pass a JSON object or a .jsonl file") from None
    if isinstance(data, dict):
        return [data] * count
    if isinstance(data, list) and len(data) == count and all(isinstance(d, dict) for d in data):
        return data
    raise UserError(f"--metadata must be one JSON object or a list of {count} objects (one per image)")


def score_from_cli(images: list[Path], reward: str, prompts: list[str], metadata: str | None, options: list[str]) -> list[dict[str, Any]]:
    if not prompts:
        raise UserError(f"no --prompt given; pass one --prompt for all images or one per image ({len(images)})")
    if len(prompts) not in {1, len(images)}:
        raise UserError(f"give one --prompt for all images or one per image ({len(images)}), not {len(prompts)}")
    if len(prompts) == 1:
        prompts = prompts * len(images)
    config: dict[str, Any] = {}
    for text in options:
        keys, value = parse_override(text)
        node = config
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    tensors = load_images(images)
    records = parse_metadata(metadata, len(images))
    model = registry.load("rewards", reward, config)
    results = []
    for path, image, prompt, meta in zip(images, tensors, prompts, records):
        score = model(image.unsqueeze(0), [prompt], [meta])
        results.append({"image": str(path), "prompt": prompt, "reward": reward, "score": float(torch.as_tensor(score).reshape(-1)[0])})
    return results
