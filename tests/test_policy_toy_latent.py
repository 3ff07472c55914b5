"""The latent toy: autoencoder + MLP flow model + the toy text encoder, on the shared adapter."""

from __future__ import annotations

import pytest
import torch
from densegrpo.components.policies.adapter import FlowTransformerPolicy
from densegrpo.contracts import registry
from densegrpo.contracts.protocols import Policy
from densegrpo.worlds.toy.autoencoder import ToyAutoencoder
from densegrpo.worlds.toy.latent_denoiser import ToyLatentDenoiser
from densegrpo.worlds.toy.latent_policy import (
    ToyLatentPolicy,
    denoiser_forward,
    packaged_latent_weights,
)

PROMPTS = ["a photo of a red circle", "a photo of two blue squares"]


@pytest.fixture(scope="module")
def random_policy():
    return registry.load("policies", "toy-latent", {"weights": "random", "seed": 0})


def test_random_latent_toy_is_a_policy_on_the_shared_adapter(random_policy):
    policy = random_policy
    assert isinstance(policy, Policy) and isinstance(policy, FlowTransformerPolicy)
    assert type(policy).velocity is FlowTransformerPolicy.velocity
    assert policy.parts.forward is denoiser_forward
    assert policy.latent_shape == (4, 4, 4)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v = policy.velocity(torch.randn(2, 4, 4, 4), torch.tensor([1.0, 0.3]), cond)
        images = policy.decode(torch.randn(2, 4, 4, 4))
    assert v.shape == (2, 4, 4, 4) and v.dtype == torch.float32
    assert images.shape == (2, 3, 32, 32) and images.min() >= 0 and images.max() <= 1
    trainable = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    adapted = {n.split(".lora_")[0].split(".")[-1] for n in trainable}
    assert adapted == {"fc1", "fc2", "modulation", "text_embed", "proj_in", "proj_out"}
    assert not any("time_embed" in n for n in trainable)
    assert not any(p.requires_grad for p in policy.autoencoder.parameters())
    assert not any(p.requires_grad for p in policy.text_encoder.parameters())


def test_denoiser_forward_reads_time_and_prompt():
    torch.manual_seed(0)
    model = ToyLatentDenoiser()
    for parameter in model.parameters():  # the zero-initialised output and modulations would hide both inputs
        torch.nn.init.normal_(parameter, std=0.05)
    x = torch.randn(3, 4, 4, 4)
    pooled = torch.randn(3, 64)
    v = model(x, torch.full((3,), 0.5), pooled)
    assert v.shape == x.shape
    assert not torch.allclose(v, model(x, torch.full((3,), 0.9), pooled))
    assert not torch.allclose(v, model(x, torch.full((3,), 0.5), pooled.flip(0)))


def test_shipped_latent_weights_are_small_and_load_from_package_data():
    folder = packaged_latent_weights()
    files = [p for p in folder.rglob("*") if p.is_file()]
    names = {p.relative_to(folder).as_posix() for p in files}
    assert {"denoiser/config.json", "denoiser/diffusion_pytorch_model.safetensors",
            "autoencoder/config.json", "autoencoder/diffusion_pytorch_model.safetensors", "train_info.json"} <= names
    assert sum(p.stat().st_size for p in files) <= 10 * 1024 * 1024


def test_autoencoder_reconstructs_fresh_scenes_the_detector_reads():
    """Unseen renders of held-out prompts survive encode -> decode: the detector's toy-GenEval on
    the reconstructions stays close to that of the renders (the decoder is the latent toy's 'VAE')."""
    from densegrpo.worlds.toy.geneval_reward import ToyGenEvalReward
    from densegrpo.worlds.toy.prompts import load_prompts
    from densegrpo.worlds.toy.scenes import render_batch

    metadata = load_prompts("toy-test")
    images = render_batch(metadata, seed=321)
    autoencoder = ToyAutoencoder.from_pretrained(packaged_latent_weights() / "autoencoder").eval()
    with torch.no_grad():
        raw = autoencoder.encode(images)
        recon = autoencoder.decode(raw)
        latents = autoencoder.scale_latents(raw)
    assert abs(latents.mean().item()) < 0.3 and 0.6 < latents.std().item() < 1.5  # the flow model's unit scale
    assert torch.allclose(autoencoder.unscale_latents(latents), raw, atol=1e-5)
    reward = ToyGenEvalReward()
    prompts = [m["prompt"] for m in metadata]
    rendered, decoded = reward(images, prompts, metadata), reward(recon, prompts, metadata)
    assert rendered.mean() > 0.95
    assert decoded.mean() > 0.65  # measured 0.748 on these renders (docs/policies.md); a broken decoder scores near 0


def test_pretrained_denoiser_beats_a_random_one_on_scene_latents():
    from densegrpo.worlds.toy.prompts import load_prompts
    from densegrpo.worlds.toy.scenes import render_batch

    metadata = load_prompts("toy-test")[:32]
    pretrained = ToyLatentPolicy(ToyLatentPolicy.Config(lora={"enabled": False}))
    random = ToyLatentPolicy(ToyLatentPolicy.Config(weights="random", lora={"enabled": False}))
    autoencoder = pretrained.autoencoder
    with torch.no_grad():
        x0 = autoencoder.scale_latents(autoencoder.encode(render_batch(metadata, seed=5)))
    generator = torch.Generator().manual_seed(0)
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(len(metadata), generator=generator) * 0.8 + 0.1
    s = sigma.view(-1, 1, 1, 1)
    x_sigma, target = (1 - s) * x0 + s * eps, eps - x0

    def loss(policy):
        with torch.no_grad():
            v = policy.velocity(x_sigma, sigma, policy.encode([m["prompt"] for m in metadata]))
        return (v - target).pow(2).mean().item()

    assert loss(pretrained) < 0.5 * loss(random)


def test_reference_disables_lora_and_lora_file_round_trip(tmp_path):
    policy = ToyLatentPolicy(ToyLatentPolicy.Config(weights="random", seed=0))
    x, sigma = torch.randn(2, 4, 4, 4), torch.full((2,), 0.5)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if ("proj_out" in name or "modulation" in name) and "lora_" not in name:
                param.normal_(0, 0.05)  # zero-initialised layers would hide the adapter
        v_base = policy.velocity(x, sigma, cond)
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.2)
        v_lora = policy.velocity(x, sigma, cond)
        with policy.reference():
            v_ref = policy.velocity(x, sigma, cond)
    assert (v_lora - v_base).abs().max() > 1e-3
    assert torch.allclose(v_ref, v_base, atol=1e-6)
    path = policy.save_lora(tmp_path)
    assert path.name == "pytorch_lora_weights.safetensors"
    fresh = ToyLatentPolicy(ToyLatentPolicy.Config(weights="random", seed=0))
    fresh.load_lora(tmp_path)
    expected = policy.trainable_state_dict()
    assert all(torch.equal(fresh.trainable_state_dict()[k], v) for k, v in expected.items())


def test_cfg_on_the_latent_toy(random_policy):
    guided = ToyLatentPolicy(ToyLatentPolicy.Config(weights="random", seed=0, guidance_scale=3.0))
    with torch.no_grad():
        for a, b in zip(guided.transformer.parameters(), random_policy.transformer.parameters()):
            b.copy_(a)
    cond = guided.encode(PROMPTS)
    assert cond.negative is not None and cond.negative.prompts == ["", ""]
    x, sigma = torch.randn(2, 4, 4, 4), torch.full((2,), 0.5)
    with torch.no_grad():
        v = guided.velocity(x, sigma, cond)
        v_pos = random_policy.velocity(x, sigma, random_policy.encode(PROMPTS))
        v_neg = random_policy.velocity(x, sigma, random_policy.encode(["", ""]))
    assert torch.allclose(v, v_neg + 3.0 * (v_pos - v_neg), atol=1e-5)


def test_missing_weights_are_one_user_error(tmp_path):
    from densegrpo.contracts.errors import UserError

    with pytest.raises(UserError, match="latent toy weights are missing"):
        ToyLatentPolicy(ToyLatentPolicy.Config(model=str(tmp_path)))


def test_inference_decode_is_the_decoder_bit_for_bit(random_policy):
    """Without autograd ``decode`` runs the SiLUs in place; the images must not change by a bit,
    and with autograd the plain module chain still backpropagates."""
    autoencoder = ToyAutoencoder.from_pretrained(packaged_latent_weights() / "autoencoder").eval()
    latents = torch.randn(64, 4, 4, 4, generator=torch.Generator().manual_seed(0)) * 1.5
    with torch.no_grad():
        fast = autoencoder.decode(latents, clamp=False)
    plain = (autoencoder.decoder(latents) + 1) / 2
    assert torch.equal(fast, plain.detach())
    assert fast.std() > 0.05  # real images, not a constant
    plain.sum().backward()
    assert autoencoder.decoder[0].weight.grad is not None
    # the policy's chunked channels-last decode: the same images up to memory-format rounding
    with torch.no_grad():
        reference = random_policy.autoencoder.decoder(random_policy.autoencoder.unscale_latents(latents))
    images = random_policy.decode(latents)
    assert torch.allclose(images, ((reference + 1) / 2).clamp(0, 1), atol=1e-5, rtol=0)
