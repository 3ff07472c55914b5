"""Shared fixtures: CPU-only, seeded, offline, and a fake third-party distribution."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DENSEGRPO_TEST", "1")

import torch  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    yield


def make_fake_distribution(root: Path, dist: str, module: str, source: str, entry_points: str, version: str = "9.9.9") -> Path:
    """Write an importable module and a ``*.dist-info`` with ``entry_points.txt`` under ``root``."""
    (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points), encoding="utf-8")
    return info


FAKE_REWARD_SOURCE = '''
    import torch
    from pydantic import BaseModel, ConfigDict, Field


    class BrightnessReward:
        """Mean brightness of an image, a reward a third party might publish."""

        class Config(BaseModel):
            model_config = ConfigDict(extra="forbid")
            scale: float = Field(1.0, description="Multiplier on the mean brightness.")

        def __init__(self, config=None):
            self.config = config or self.Config()

        def __call__(self, images, prompts, metadata):
            return images.float().mean(dim=(1, 2, 3)) * self.config.scale
'''


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    """A third-party package ``densegrpo-fake`` registering the reward ``fake-brightness``."""
    from densegrpo.contracts import registry

    make_fake_distribution(
        tmp_path,
        "densegrpo-fake",
        "densegrpo_fake_reward",
        FAKE_REWARD_SOURCE,
        """
        [densegrpo.rewards]
        fake-brightness = densegrpo_fake_reward:BrightnessReward
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    registry.refresh()
    yield tmp_path
    monkeypatch.undo()
    sys.modules.pop("densegrpo_fake_reward", None)
    registry.refresh()
