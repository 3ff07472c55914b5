"""ImageReward plugin against image-reward's own ``score`` / ``inference_rank`` on tiny random weights."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

if importlib.util.find_spec("ImageReward") is None:  # its __init__ needs OpenAI clip: do not import it
    pytest.skip("install with `pip install --no-deps image-reward==1.5`", allow_module_level=True)

from densegrpo.api import UserError  # noqa: E402
from densegrpo_imagereward.compat import upstream  # noqa: E402
from densegrpo_imagereward.errors import MissingWeightsError  # noqa: E402
from densegrpo_imagereward.model import (  # noqa: E402
    load_pretrained,
    tiny_med_config,
    tiny_upstream,
    tiny_vit_builder,
)
from densegrpo_imagereward.reward import ImageRewardReward, preprocess  # noqa: E402

PROMPTS = ["a photo of a red cat", "two blue cars on the road", "a sign that says open"]


@pytest.fixture(scope="module")
def tiny_model():
    return tiny_upstream(seed=0)


@pytest.fixture(scope="module")
def images_uint8() -> np.ndarray:
    """Three (224, 224, 3) uint8 images: the plugin and upstream see exactly the same pixels."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(3, 224, 224, 3), dtype=np.uint8)


def as_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0


def test_each_pair_matches_upstream_score(tiny_model, images_uint8):
    reward = ImageRewardReward.from_modules(tiny_model)
    ours = reward(as_tensor(images_uint8), PROMPTS, [None] * 3)
    assert ours.shape == (3,) and ours.dtype == torch.float32
    expected = [tiny_model.score(p, Image.fromarray(im)) for p, im in zip(PROMPTS, images_uint8)]
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-5)
    # a cross product (every image against prompt 0) would give visibly different numbers
    crossed = tiny_model.score(PROMPTS[0], Image.fromarray(images_uint8[1]))
    assert abs(crossed - float(ours[1])) > 1e-3


def test_one_prompt_many_images_matches_inference_rank(tiny_model, images_uint8):
    reward = ImageRewardReward.from_modules(tiny_model, {"batch_size": 2})
    ours = reward(as_tensor(images_uint8), [PROMPTS[1]] * 3, [None] * 3)
    _, expected = tiny_model.inference_rank(PROMPTS[1], [Image.fromarray(im) for im in images_uint8])
    torch.testing.assert_close(ours, torch.tensor(expected, dtype=torch.float32), rtol=0, atol=1e-5)


def test_batch_size_does_not_change_scores(tiny_model, images_uint8):
    whole = ImageRewardReward.from_modules(tiny_model, {"batch_size": 16})(as_tensor(images_uint8), PROMPTS, [None] * 3)
    split = ImageRewardReward.from_modules(tiny_model, {"batch_size": 1})(as_tensor(images_uint8), PROMPTS, [None] * 3)
    torch.testing.assert_close(whole, split, rtol=0, atol=1e-5)


def test_resize_path_is_close_to_upstream_pil_resize():
    # a smooth 256x320 image: torch's antialiased bicubic vs PIL's bicubic differ by rounding only
    ramp = np.linspace(0, 1, 320)[None, :, None] * np.linspace(0, 1, 256)[:, None, None] * np.array([1, 0.5, 0.2])
    pixels = (ramp * 255).astype(np.uint8)
    reference = upstream().ImageReward._transform(224)(Image.fromarray(pixels))
    ours = preprocess(as_tensor(pixels[None]))[0]
    assert ours.shape == reference.shape == (3, 224, 224)
    assert (ours - reference).abs().max() < 0.03  # normalised units; 1/255/0.27 = 0.015 is one grey level


def test_checkpoint_round_trip_through_weights_only_load(tmp_path, tiny_model, images_uint8):
    torch.save(tiny_model.state_dict(), tmp_path / "ImageReward.pt")
    tokenizer = tiny_model.blip.tokenizer
    (tmp_path / "med_config.json").write_text(json.dumps(tiny_med_config(len(tokenizer))))
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    loaded = load_pretrained(str(tmp_path), str(tokenizer_dir), create_vit=tiny_vit_builder())
    a = ImageRewardReward.from_modules(tiny_model)(as_tensor(images_uint8), PROMPTS, [None] * 3)
    b = ImageRewardReward.from_modules(loaded)(as_tensor(images_uint8), PROMPTS, [None] * 3)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_missing_local_weights_is_one_line_user_error(tmp_path):
    with pytest.raises(MissingWeightsError) as caught:
        ImageRewardReward(ImageRewardReward.Config(model_path=str(tmp_path / "nowhere")))
    assert isinstance(caught.value, UserError)
    message = str(caught.value)
    assert "\n" not in message and "model_path" in message


def test_offline_hub_id_fails_fast_without_download(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    code = (
        "from densegrpo_imagereward.reward import ImageRewardReward\n"
        "try:\n    ImageRewardReward()\nexcept Exception as e:\n    print(type(e).__name__, '|', e)\n"
    )
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert time.monotonic() - start < 60
    line = out.stdout.strip()
    assert line.startswith("MissingWeightsError |"), out.stdout + out.stderr
    assert "ImageReward.pt" in line and "THUDM/ImageReward" in line and "model_path" in line


def test_wrong_prompt_count_is_value_error(tiny_model):
    with pytest.raises(ValueError, match="one prompt per image"):
        ImageRewardReward.from_modules(tiny_model)(torch.rand(2, 3, 224, 224), ["only one"], [None, None])


def test_registered_through_entry_point():
    from densegrpo.api import registry

    assert registry.load_class("rewards", "imagereward") is ImageRewardReward
