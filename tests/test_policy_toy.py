"""The toy policy: shipped weights, the same adapter as sd3/flux, LoRA, reference, CFG."""

from __future__ import annotations

import pytest
import torch
from densegrpo.components.policies.adapter import FlowTransformerPolicy
from densegrpo.contracts import registry
from densegrpo.contracts.protocols import Policy
from densegrpo.contracts.tokenizers import CLIP_VOCAB_SIZE
from densegrpo.worlds.toy.policy import (
    ToyPolicy,
    latents_to_pixels,
    packaged_weights,
    pixels_to_latents,
    unet_forward,
)

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


@pytest.fixture(scope="module")
def random_policy():
    return registry.load("policies", "toy", {"weights": "random", "seed": 0})


def test_random_toy_is_a_policy_on_the_shared_adapter(random_policy):
    policy = random_policy
    assert isinstance(policy, Policy) and isinstance(policy, FlowTransformerPolicy)
    assert type(policy).velocity is FlowTransformerPolicy.velocity  # no toy-only shortcut
    assert policy.parts.forward is unet_forward
    assert policy.latent_shape == (3, 32, 32)
    assert len(policy.tokenizer) == CLIP_VOCAB_SIZE
    cond = policy.encode(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 24, 64) and cond.pooled_embeds.shape == (2, 64)
    with torch.no_grad():
        v = policy.velocity(torch.randn(2, 3, 32, 32), torch.tensor([1.0, 0.3]), cond)
    assert v.shape == (2, 3, 32, 32) and v.dtype == torch.float32
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert all(not p.requires_grad for p in policy.text_encoder.parameters())


def test_pixel_space_decode():
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(latents_to_pixels(pixels_to_latents(images)), images, atol=1e-6)
    assert latents_to_pixels(torch.full((1, 3, 2, 2), 3.0)).max() == 1.0
    assert latents_to_pixels(torch.full((1, 3, 2, 2), -3.0)).min() == 0.0


def test_reference_disables_lora(random_policy):
    policy = ToyPolicy(ToyPolicy.Config(weights="random", seed=0))
    x, sigma = torch.randn(2, 3, 32, 32), torch.full((2,), 0.5)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v_base = policy.velocity(x, sigma, cond)
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
        v_lora = policy.velocity(x, sigma, cond)
        with policy.reference():
            v_ref = policy.velocity(x, sigma, cond)
    assert (v_lora - v_base).abs().max() > 1e-3
    assert torch.allclose(v_ref, v_base, atol=1e-6)


def test_shipped_weights_are_small_and_load_from_package_data():
    folder = packaged_weights()
    files = [p for p in folder.rglob("*") if p.is_file()]
    names = {p.relative_to(folder).as_posix() for p in files}
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json", "text_encoder/model.safetensors"} <= names
    assert sum(p.stat().st_size for p in files) <= 20 * 1024 * 1024


@pytest.mark.parametrize("resolution", [32, 16])
def test_pretrained_weights_denoise_toy_scenes(resolution):
    """The shipped model's rectified-flow loss on fresh toy scenes (rendered at its resolution) is
    far below a random model's."""
    from densegrpo.worlds.toy.prompts import load_prompts
    from densegrpo.worlds.toy.scenes import render_batch

    metadata = load_prompts("toy-test")[:16]
    x0 = pixels_to_latents(render_batch(metadata, seed=123, size=resolution))
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(len(metadata), generator=generator) * 0.8 + 0.1
    s = sigma.view(-1, 1, 1, 1)
    x_sigma, target = (1 - s) * x0 + s * eps, eps - x0

    def loss(policy):
        with torch.no_grad():
            v = policy.velocity(x_sigma, sigma, policy.encode([m["prompt"] for m in metadata]))
        return (v - target).pow(2).mean().item()

    pretrained = ToyPolicy(ToyPolicy.Config(resolution=resolution, lora={"enabled": True, "rank": 4, "alpha": 8.0}))
    random = ToyPolicy(ToyPolicy.Config(weights="random", resolution=resolution))
    assert loss(pretrained) < 0.5 * loss(random)


def test_cfg_on_the_toy(random_policy):
    guided = ToyPolicy(ToyPolicy.Config(weights="random", seed=0, guidance_scale=3.0))
    cond = guided.encode(PROMPTS)
    assert cond.negative is not None and cond.negative.prompts == ["", ""]
    x, sigma = torch.randn(2, 3, 32, 32), torch.full((2,), 0.5)
    with torch.no_grad():
        v = guided.velocity(x, sigma, cond)
        v_pos = random_policy.velocity(x, sigma, random_policy.encode(PROMPTS))
        v_neg = random_policy.velocity(x, sigma, random_policy.encode(["", ""]))
    assert torch.allclose(v, v_neg + 3.0 * (v_pos - v_neg), atol=1e-5)


def test_lora_file_round_trip(tmp_path):
    policy = ToyPolicy(ToyPolicy.Config(weights="random", seed=0))
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    path = policy.save_lora(tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    fresh = ToyPolicy(ToyPolicy.Config(weights="random", seed=0))
    fresh.load_lora(tmp_path)
    expected = policy.trainable_state_dict()
    assert all(torch.equal(fresh.trainable_state_dict()[k], v) for k, v in expected.items())


def test_16px_toy_loads_its_unet_and_the_32px_text_encoder():
    from densegrpo.worlds.toy.policy import TOY_RESOLUTIONS

    assert TOY_RESOLUTIONS == (32, 16)
    folder = packaged_weights(16)
    files = [p for p in folder.rglob("*") if p.is_file()]
    names = {p.relative_to(folder).as_posix() for p in files}
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors", "train_info.json"} <= names
    assert not (folder / "text_encoder").exists()
    assert sum(p.stat().st_size for p in files) <= 4 * 1024 * 1024  # fp16 UNet alone
    small = ToyPolicy(ToyPolicy.Config(resolution=16))
    large = ToyPolicy(ToyPolicy.Config())
    assert small.latent_shape == (3, 16, 16) and small.transformer.config.sample_size == 16
    assert all(torch.equal(a, b) for a, b in zip(small.text_encoder.parameters(), large.text_encoder.parameters()))
    assert all(p.dtype == torch.float32 for p in small.transformer.parameters())  # fp16 on disk, fp32 in use
    # a different UNet: fine-tuned from the 32 px one, not the same weights
    assert not torch.equal(next(small.transformer.parameters()), next(large.transformer.parameters()))
    cond = small.encode(PROMPTS)
    with torch.no_grad():
        v = small.velocity(torch.randn(2, 3, 16, 16), torch.tensor([1.0, 0.3]), cond)
    assert v.shape == (2, 3, 16, 16)
    images = small.decode(v)
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1  # rewards see 32 px


def test_16px_decode_upsamples_and_32px_decode_does_not():
    # a horizontal ramp: bilinear upsampling keeps it a ramp, so 2x2 block means give it back
    ramp = torch.linspace(-0.9, 0.9, 16).expand(1, 3, 16, 16)
    up = latents_to_pixels(ramp)
    assert up.shape == (1, 3, 32, 32)
    blocks = torch.nn.functional.avg_pool2d(up, 2)
    assert torch.allclose(blocks[..., 1:-1], ((ramp + 1) / 2)[..., 1:-1], atol=1e-5)
    assert torch.equal(latents_to_pixels(torch.full((1, 3, 16, 16), 0.5)), torch.full((1, 3, 32, 32), 0.75))
    assert latents_to_pixels(pixels_to_latents(torch.full((1, 3, 32, 32), 0.25))).shape == (1, 3, 32, 32)


def test_unknown_resolution_is_refused():
    from densegrpo.contracts.errors import UserError
    from densegrpo.worlds.toy.policy import build_toy_modules

    with pytest.raises(UserError, match="resolution 24"):
        build_toy_modules(resolution=24)


def test_partial_lora_override_keeps_the_toy_rank():
    from densegrpo.contracts import config as cfg

    resolved = cfg.resolve(None, ["policy.name=toy", "policy.config.lora.target_modules=[attn2.to_q,attn2.to_k,attn2.to_v,attn2.to_out.0]"])
    policy = ToyPolicy(ToyPolicy.Config(**resolved.policy.config, weights="random"))
    assert policy.config.lora.rank == 8 and policy.config.lora.alpha == 16.0
    # rank 8 on the 14 cross-attention blocks' q/k/v/out: A (8 x in) + B (out x 8) each
    lora = {name: p for name, p in policy.transformer.named_parameters() if p.requires_grad}
    assert lora and all(".attn2." in name for name in lora)
    assert all(min(p.shape) == 8 for p in lora.values())
    assert ToyPolicy.Config(lora={"rank": 4}).lora.alpha == 16.0
