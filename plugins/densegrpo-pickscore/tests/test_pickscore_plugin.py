"""PickScore / CLIPScore plugin: parity with a direct transformers computation on tiny random CLIPs.

Reference = what PickScore's and Flow-GRPO's scorers do by hand: 8-bit PIL images and prompts
through ``CLIPProcessor``, then ``CLIPModel(...).logits_per_image.diagonal()`` (which is
``logit_scale.exp() * cos``), divided by Flow-GRPO's divisor. No hub access.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from densegrpo.api import UserError
from densegrpo_pickscore._clip import WeightsNotFoundError
from densegrpo_pickscore.clipscore import CLIPScoreReward
from densegrpo_pickscore.pickscore import PickScoreReward
from densegrpo_pickscore.testing import tiny_clip
from PIL import Image

PROMPTS = ["a red cube on a table", "two dogs", 'a sign that says "OPEN"', "x"]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(seed=0)


def eight_bit(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Random images whose values are exactly k/255, so 8-bit conversion is lossless."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, height, width), generator=g).float() / 255


def smooth(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """Smooth 8-bit images (low-frequency patterns), closer to generated images than noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 5, 6, generator=g)
    up = torch.nn.functional.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=True)
    return (up * 255).round() / 255


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    return [Image.fromarray((im.permute(1, 2, 0) * 255).round().byte().numpy()) for im in images]


def reference(model, processor, images, prompts, divisor=1.0) -> torch.Tensor:
    inputs = processor(
        text=prompts, images=to_pil(images), padding=True, truncation=True, max_length=77, return_tensors="pt"
    )
    with torch.no_grad():
        out = model(**inputs)
    return out.logits_per_image.diagonal() / divisor


@pytest.mark.parametrize("cls, divisor", [(PickScoreReward, 1.0), (PickScoreReward, 26.0), (CLIPScoreReward, 30.0)])
def test_processor_mode_equals_direct_transformers(clip, cls, divisor):
    model, processor = clip
    images = eight_bit(4, 41, 52)  # needs resize and crop
    reward = cls.from_modules(model, processor, cls.Config(device="cpu", divisor=divisor, preprocess="processor"))
    got = reward(images, PROMPTS, [None] * 4)
    want = reference(model, processor, images, PROMPTS, divisor)
    assert got.dtype == torch.float32 and got.shape == (4,)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [PickScoreReward, CLIPScoreReward])
def test_torch_mode_equals_direct_transformers_without_resize(clip, cls):
    model, processor = clip
    images = eight_bit(4, 30, 30, seed=1)  # the crop size: preprocessing is normalisation only
    reward = cls.from_modules(model, processor, cls.Config(device="cpu"))
    want = reference(model, processor, images, PROMPTS, reward.config.divisor)
    torch.testing.assert_close(reward(images, PROMPTS, [None] * 4), want, rtol=0, atol=1e-5)


def test_torch_preprocessing_matches_processor_within_8bit_rounding(clip):
    model, processor = clip
    reward = PickScoreReward.from_modules(model, processor, PickScoreReward.Config(device="cpu"))
    for height, width in [(41, 52), (64, 37), (512, 512)]:
        images = smooth(3, height, width)
        mine = reward.scorer.preprocess(images)
        theirs = processor.image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        assert mine.shape == theirs.shape
        # the processor resizes uint8 images and rounds to 8 bits: at most ~1 level apart
        level = 1 / 255 / min(processor.image_processor.image_std)
        assert (mine - theirs).abs().max() <= 1.05 * level
        want = reference(model, processor, images, PROMPTS[:3])
        torch.testing.assert_close(reward(images, PROMPTS[:3], [None] * 3), want, rtol=0, atol=2e-2)


def test_scores_pairs_not_cross_product_and_batches_agree(clip):
    model, processor = clip
    images = eight_bit(4, 30, 30, seed=2)
    whole = PickScoreReward.from_modules(model, processor, PickScoreReward.Config(device="cpu"))
    chunked = PickScoreReward.from_modules(model, processor, PickScoreReward.Config(device="cpu", batch_size=3))
    scores = whole(images, PROMPTS, [None] * 4)
    torch.testing.assert_close(chunked(images, PROMPTS, [None] * 4), scores, rtol=0, atol=1e-5)
    order = [2, 0, 3, 1]
    permuted = whole(images[order], [PROMPTS[i] for i in order], [None] * 4)
    torch.testing.assert_close(permuted, scores[order], rtol=0, atol=1e-5)
    # the same image with another prompt scores differently: prompts matter
    assert not torch.allclose(whole(images, PROMPTS[::-1], [None] * 4), scores)


def test_pickscore_is_logit_scale_times_cosine(clip):
    model, processor = clip
    images = eight_bit(2, 30, 30, seed=3)
    reward = PickScoreReward.from_modules(model, processor, PickScoreReward.Config(device="cpu", divisor=26.0))
    with torch.no_grad():
        pixels = processor.image_processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        image = model.get_image_features(pixel_values=pixels).pooler_output
        tokens = processor.tokenizer(PROMPTS[:2], padding="max_length", max_length=77, return_tensors="pt")
        text = model.get_text_features(**tokens).pooler_output
        cos = torch.nn.functional.cosine_similarity(image, text, dim=-1)
    want = model.logit_scale.exp() * cos / 26
    torch.testing.assert_close(reward(images, PROMPTS[:2], [None, None]), want, rtol=0, atol=1e-5)


def test_gradients_flow_through_torch_preprocessing(clip):
    model, processor = clip
    reward = PickScoreReward.from_modules(model, processor, PickScoreReward.Config(device="cpu"))
    images = smooth(2, 40, 40).requires_grad_(True)
    reward.score(images, PROMPTS[:2]).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_dtype_is_configurable(clip):
    model, processor = clip
    images = eight_bit(2, 30, 30, seed=4)
    full = PickScoreReward.from_modules(model, processor, PickScoreReward.Config(device="cpu"))(images, PROMPTS[:2], [None] * 2)
    model16, _ = tiny_clip(seed=0)
    half = PickScoreReward.from_modules(model16, processor, PickScoreReward.Config(device="cpu", dtype="bfloat16"))
    got = half(images, PROMPTS[:2], [None] * 2)
    assert got.dtype == torch.float32
    assert next(half.scorer.model.parameters()).dtype == torch.bfloat16
    torch.testing.assert_close(got, full, rtol=0, atol=0.1)


def test_loads_from_a_local_folder(clip, tmp_path):
    model, processor = clip
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "processor")
    assert (tmp_path / "model" / "model.safetensors").exists()
    config = PickScoreReward.Config(model=str(tmp_path / "model"), processor=str(tmp_path / "processor"), device="cpu")
    loaded = PickScoreReward(config)
    images = eight_bit(2, 30, 30, seed=5)
    want = reference(model, processor, images, PROMPTS[:2])
    torch.testing.assert_close(loaded(images, PROMPTS[:2], [None] * 2), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("cls", [PickScoreReward, CLIPScoreReward])
def test_missing_weights_offline_is_one_clear_line(cls, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as info:
        cls(cls.Config(model="densegrpo-test/no-such-model", processor="densegrpo-test/no-such-processor"))
    message = str(info.value)
    assert isinstance(info.value, UserError) and "\n" not in message
    assert "densegrpo-test/no-such-processor" in message and "hf download" in message and "offline" in message
    with pytest.raises(WeightsNotFoundError, match="does not exist"):
        cls(cls.Config(model=str(tmp_path / "missing"), processor=str(tmp_path / "missing"), offline=True))


def test_bad_inputs_raise_value_errors(clip):
    model, processor = clip
    reward = PickScoreReward.from_modules(model, processor, PickScoreReward.Config(device="cpu"))
    with pytest.raises(ValueError, match="one prompt per image"):
        reward(eight_bit(2, 30, 30), ["only one"], [None, None])
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        reward(torch.rand(2, 30, 30), PROMPTS[:2], [None, None])
    with pytest.raises(ValueError, match="floating point"):
        reward(torch.zeros(2, 3, 30, 30, dtype=torch.uint8), PROMPTS[:2], [None, None])


def test_registered_and_lazy():
    code = (
        "import sys; from densegrpo.api import registry; names = registry.available('rewards'); "
        "assert {'pickscore', 'clipscore'} <= set(names), names; "
        "cls = registry.load_class('rewards', 'pickscore'); "
        "assert 'transformers' not in sys.modules, 'importing the plugin loaded transformers'; "
        "registry.validate_config('rewards', 'clipscore', {'divisor': 26}); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    for cls in (PickScoreReward, CLIPScoreReward):
        for name, field in cls.Config.model_fields.items():
            assert field.description, f"{cls.__name__}.Config.{name} has no description"
        with pytest.raises(Exception):
            cls.Config(unknown=1)


def test_unreachable_hub_fails_fast_with_one_line(monkeypatch):
    import densegrpo.contracts.hub as hub_module

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    def unreachable(repo_id):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(hub_module, "probe_hub", unreachable)
    with pytest.raises(WeightsNotFoundError) as info:
        PickScoreReward(PickScoreReward.Config(processor="densegrpo-test/no-such-processor"))
    message = str(info.value)
    assert "\n" not in message and "could not be downloaded" in message and "ConnectionError" in message
