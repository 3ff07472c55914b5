"""Aesthetic plugin: parity with the MLP applied by hand on a tiny random CLIP, offline.

Reference = improved-aesthetic-predictor's inference: CLIP image features of the processor's
pixels, L2-normalised (its ``normalized``), then the five linear layers written out as matmuls.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from densegrpo.api import UserError, WeightsNotFoundError
from densegrpo_aesthetic.aesthetic import AestheticMLP, AestheticReward
from densegrpo_aesthetic.testing import tiny_clip_vision, tiny_mlp
from PIL import Image

LINEARS = ["layers.0", "layers.2", "layers.4", "layers.6", "layers.7"]


@pytest.fixture(scope="module")
def parts():
    model, processor = tiny_clip_vision()
    return model, processor, tiny_mlp(seed=3)


def eight_bit(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=g).float() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]


def by_hand(model, processor, mlp, images) -> torch.Tensor:
    pixels = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        features = model.get_image_features(pixel_values=pixels).pooler_output.numpy().astype(np.float64)
    norm = np.linalg.norm(features, ord=2, axis=-1, keepdims=True)
    x = features / np.where(norm == 0, 1, norm)
    state = {k: v.double().numpy() for k, v in mlp.state_dict().items()}
    for name in LINEARS:  # no activations between the layers; dropout is off at inference
        x = x @ state[f"{name}.weight"].T + state[f"{name}.bias"]
    return torch.from_numpy(x[:, 0]).float()


def test_mlp_architecture_matches_improved_aesthetic_predictor():
    shapes = {k: tuple(v.shape) for k, v in AestheticMLP().state_dict().items()}
    assert shapes == {
        "layers.0.weight": (1024, 768), "layers.0.bias": (1024,),
        "layers.2.weight": (128, 1024), "layers.2.bias": (128,),
        "layers.4.weight": (64, 128), "layers.4.bias": (64,),
        "layers.6.weight": (16, 64), "layers.6.bias": (16,),
        "layers.7.weight": (1, 16), "layers.7.bias": (1,),
    }


@pytest.mark.parametrize("preprocess, height, width", [("processor", 41, 52), ("torch", 30, 30)])
def test_equals_mlp_applied_by_hand(parts, preprocess, height, width):
    model, processor, mlp = parts
    reward = AestheticReward.from_modules(model, processor, mlp, AestheticReward.Config(device="cpu", preprocess=preprocess))
    images = eight_bit(4, height, width, seed=1)
    got = reward(images, ["ignored"] * 4, [None] * 4)
    assert got.shape == (4,) and got.dtype == torch.float32
    torch.testing.assert_close(got, by_hand(model, processor, mlp, images), rtol=0, atol=1e-5)


def test_torch_preprocessing_close_to_processor_with_resize(parts):
    model, processor, mlp = parts
    reward = AestheticReward.from_modules(model, processor, mlp, AestheticReward.Config(device="cpu"))
    g = torch.Generator().manual_seed(2)
    coarse = torch.rand(3, 3, 5, 6, generator=g)
    images = torch.nn.functional.interpolate(coarse, size=(64, 48), mode="bilinear", align_corners=True)
    images = (images * 255).round() / 255
    level = 1 / 255 / min(processor.image_std)
    theirs = processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
    assert (reward.preprocess(images) - theirs).abs().max() <= 1.05 * level
    torch.testing.assert_close(reward(images, [""] * 3, [None] * 3), by_hand(model, processor, mlp, images), rtol=0, atol=1e-2)


def test_batches_agree_and_gradients_flow(parts):
    model, processor, mlp = parts
    images = eight_bit(5, 40, 36, seed=4)
    whole = AestheticReward.from_modules(model, processor, mlp, AestheticReward.Config(device="cpu"))
    chunked = AestheticReward.from_modules(model, processor, mlp, AestheticReward.Config(device="cpu", batch_size=2))
    torch.testing.assert_close(chunked(images, [""] * 5, [None] * 5), whole(images, [""] * 5, [None] * 5), rtol=0, atol=1e-5)
    images.requires_grad_(True)
    whole.score(images).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_loads_local_weights(parts, tmp_path):
    model, processor, mlp = parts
    model.save_pretrained(tmp_path / "clip")
    processor.save_pretrained(tmp_path / "clip")
    torch.save(mlp.state_dict(), tmp_path / "head.pth")
    from safetensors.torch import save_file

    save_file(mlp.state_dict(), tmp_path / "head.safetensors")
    images = eight_bit(2, 30, 30, seed=5)
    want = by_hand(model, processor, mlp, images)
    for head in ("head.pth", "head.safetensors"):
        config = AestheticReward.Config(clip_model=str(tmp_path / "clip"), head=str(tmp_path / head), device="cpu", offline=True)
        torch.testing.assert_close(AestheticReward(config)(images, ["", ""], [None, None]), want, rtol=0, atol=1e-5)
    # a folder holding head_filename works too
    config = AestheticReward.Config(clip_model=str(tmp_path / "clip"), head=str(tmp_path), head_filename="head.pth", device="cpu")
    torch.testing.assert_close(AestheticReward(config)(images, ["", ""], [None, None]), want, rtol=0, atol=1e-5)


def test_missing_weights_offline_is_one_clear_line(parts, monkeypatch, tmp_path):
    model, processor, _ = parts
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        AestheticReward(AestheticReward.Config(head="densegrpo-test/no-such-head"), clip_model=model, image_processor=processor)
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "densegrpo-test/no-such-head/aesthetic-model.pth" in message and "hf download" in message
    with pytest.raises(WeightsNotFoundError, match="not in the local Hugging Face cache"):
        AestheticReward(AestheticReward.Config(clip_model="densegrpo-test/no-such-clip"), mlp=AestheticMLP())
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        AestheticReward(AestheticReward.Config(head=str(tmp_path / "nope.pth")), clip_model=model, image_processor=processor)


def test_bad_inputs_raise_value_errors(parts):
    reward = AestheticReward.from_modules(*parts, AestheticReward.Config(device="cpu"))
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reward(torch.rand(3, 30, 30), [""], [None])


def test_registered_and_lazy():
    code = (
        "import sys; from densegrpo.api import registry; assert 'aesthetic' in registry.available('rewards'); "
        "registry.load_class('rewards', 'aesthetic'); "
        "assert 'transformers' not in sys.modules, 'importing the plugin loaded transformers'; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for name, field in AestheticReward.Config.model_fields.items():
        assert field.description, name
