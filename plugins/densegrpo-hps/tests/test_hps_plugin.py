"""HPS plugin: parity with hpsv2x's own scoring path on a tiny random open_clip model, offline.

Reference = ``hpsv2.img_score.score``: we build the model and validation transform with hpsv2's
``create_model_and_transforms`` (the reference's arguments, tiny architecture, no pretrained
download), hand them to ``img_score.model_dict`` and let ``score`` load our checkpoint file,
tokenize, run the model and take ``diag(image_features @ text_features.T)``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from densegrpo.api import UserError
from densegrpo_hps._hps import (
    TINY_ARCHITECTURE,
    CheckpointLoadError,
    WeightsNotFoundError,
    register_tiny_architecture,
)
from densegrpo_hps.hpsv2 import HPSv2Reward
from densegrpo_hps.hpsv21 import HPSv21Reward
from densegrpo_hps.testing import tiny_hps_model
from PIL import Image

PROMPTS = ["a red cube on a table", "two dogs", 'a sign that says "OPEN"']


def eight_bit(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random images whose values are exactly k/255, so the PIL round trip is lossless."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=g).float() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random model saved as HPS checkpoints are: ``{"state_dict": ...}`` in a .pt file."""
    path = tmp_path_factory.mktemp("hps") / "HPS_tiny.pt"
    torch.save({"state_dict": tiny_hps_model(seed=7).state_dict(), "epoch": 1}, path)
    return path


def hpsv2_reference(checkpoint, images: torch.Tensor, prompts: list[str], version: str) -> torch.Tensor:
    """``hpsv2.img_score.score`` per pair; its cache folder is pointed next to the checkpoint."""
    import hpsv2.img_score as img_score
    from hpsv2.src.open_clip import create_model_and_transforms

    register_tiny_architecture()
    model, _, preprocess_val = create_model_and_transforms(
        TINY_ARCHITECTURE, None, precision="fp32", device="cpu", jit=False, force_quick_gelu=False,
        force_custom_text=False, force_patch_dropout=False, force_image_size=None, pretrained_image=False,
        image_mean=None, image_std=None, light_augmentation=True, aug_cfg={}, output_dict=True,
        with_score_predictor=False, with_region_predictor=False,
    )
    saved, saved_root = dict(img_score.model_dict), img_score.root_path
    img_score.model_dict.update(model=model, preprocess_val=preprocess_val)
    img_score.root_path = str(checkpoint.parent / "hpsv2-root")  # score() creates this folder
    try:
        scores = [
            img_score.score([image], prompt, cp=str(checkpoint), hps_version=version)[0]
            for image, prompt in zip(to_pil(images), prompts)
        ]
    finally:
        img_score.model_dict.clear()
        img_score.model_dict.update(saved)
        img_score.root_path = saved_root
    return torch.tensor([float(s) for s in scores])


@pytest.mark.parametrize("cls, version", [(HPSv2Reward, "v2.0"), (HPSv21Reward, "v2.1")])
@pytest.mark.parametrize("height, width", [(32, 32), (40, 52), (64, 48)])  # as-is, padded wide, padded tall
def test_equals_hpsv2_img_score(checkpoint, cls, version, height, width):
    config = cls.Config(checkpoint=str(checkpoint), architecture=TINY_ARCHITECTURE, device="cpu", batch_size=2)
    reward = cls(config)
    images = eight_bit(3, height, width, seed=height)
    got = reward(images, PROMPTS, [None] * 3)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got, hpsv2_reference(checkpoint, images, PROMPTS, version), rtol=0, atol=1e-5)


def test_scores_pairs_and_prompts_matter(checkpoint):
    reward = HPSv2Reward(HPSv2Reward.Config(checkpoint=str(checkpoint), architecture=TINY_ARCHITECTURE, device="cpu"))
    images = eight_bit(3, 40, 40, seed=1)
    scores = reward(images, PROMPTS, [None] * 3)
    order = [2, 0, 1]
    torch.testing.assert_close(reward(images[order], [PROMPTS[i] for i in order], [None] * 3), scores[order], rtol=0, atol=1e-5)
    assert not torch.allclose(reward(images, PROMPTS[::-1], [None] * 3), scores)


def test_versions_have_their_own_files_and_names():
    assert HPSv2Reward.Config().checkpoint_filename == "HPS_v2_compressed.pt"
    assert HPSv21Reward.Config().checkpoint_filename == "HPS_v2.1_compressed.pt"
    assert HPSv2Reward.Config().checkpoint == HPSv21Reward.Config().checkpoint == "xswu/HPSv2"


def test_gradients_and_dtype(checkpoint):
    reward = HPSv2Reward(HPSv2Reward.Config(checkpoint=str(checkpoint), architecture=TINY_ARCHITECTURE, device="cpu"))
    images = eight_bit(2, 48, 40, seed=3).requires_grad_(True)
    reward.score(images, PROMPTS[:2]).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    half = HPSv2Reward(
        HPSv2Reward.Config(checkpoint=str(checkpoint), architecture=TINY_ARCHITECTURE, device="cpu", dtype="bfloat16")
    )
    got = half(images.detach(), PROMPTS[:2], [None] * 2)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reward(images.detach(), PROMPTS[:2], [None] * 2), rtol=0, atol=0.05)


def test_checkpoint_formats(checkpoint, tmp_path):
    from safetensors.torch import save_file

    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    save_file(state, tmp_path / "hps.safetensors")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")  # DistributedDataParallel keys
    images = eight_bit(2, 32, 32, seed=4)
    base = HPSv2Reward(HPSv2Reward.Config(checkpoint=str(checkpoint), architecture=TINY_ARCHITECTURE, device="cpu"))
    want = base(images, PROMPTS[:2], [None] * 2)
    for source, filename in [(tmp_path / "hps.safetensors", "x"), (tmp_path / "ddp.pt", "x"), (tmp_path, "ddp.pt")]:
        config = HPSv2Reward.Config(
            checkpoint=str(source), checkpoint_filename=filename, architecture=TINY_ARCHITECTURE, device="cpu"
        )
        torch.testing.assert_close(HPSv2Reward(config)(images, PROMPTS[:2], [None] * 2), want, rtol=0, atol=1e-6)


def test_pickled_code_is_refused_without_allow_pickle(tmp_path):
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": {}, "fn": print}, path)  # a reference to a function needs full unpickling
    with pytest.raises(CheckpointLoadError, match="allow_pickle"):
        HPSv2Reward(HPSv2Reward.Config(checkpoint=str(path), architecture=TINY_ARCHITECTURE, device="cpu"))


def test_missing_weights_offline_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        HPSv21Reward(HPSv21Reward.Config(checkpoint="densegrpo-test/no-such-hps"))
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "densegrpo-test/no-such-hps/HPS_v2.1_compressed.pt" in message and "hf download" in message
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        HPSv2Reward(HPSv2Reward.Config(checkpoint=str(tmp_path / "missing.pt")))
    with pytest.raises(WeightsNotFoundError, match="is not in folder"):
        HPSv2Reward(HPSv2Reward.Config(checkpoint=str(tmp_path)))


def test_bad_inputs_raise_value_errors():
    from densegrpo_hps.testing import tiny_hpsv2

    reward = tiny_hpsv2()
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(eight_bit(2, 32, 32), ["one"], [None, None])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reward(torch.rand(2, 32, 32), PROMPTS[:2], [None, None])


def test_registered_and_lazy():
    code = (
        "import sys; from densegrpo.api import registry; names = registry.available('rewards'); "
        "assert {'hpsv2', 'hpsv2.1'} <= set(names), names; "
        "registry.load_class('rewards', 'hpsv2'); registry.load_class('rewards', 'hpsv2.1'); "
        "assert 'hpsv2' not in sys.modules, 'importing the plugin imported hpsv2'; print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for cls in (HPSv2Reward, HPSv21Reward):
        for name, field in cls.Config.model_fields.items():
            assert field.description, f"{cls.__name__}.Config.{name}"
