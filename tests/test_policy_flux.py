"""FLUX policy on tiny random components: parity with diffusers' FluxPipeline, packing, LoRA."""

from __future__ import annotations

import pytest
import torch
from densegrpo.components.policies.flux import (
    FluxPolicy,
    pack_latents,
    tiny_flux_components,
    unpack_latents,
)
from densegrpo.contracts import registry
from densegrpo.contracts.protocols import Policy
from lora_checks import assert_only_lora_trains

PROMPTS = ["a red circle", "two blue squares left of a cat"]
STEPS = 4


def rollout_images(policy, prompts, noise, sigmas):
    sampler = registry.load("samplers", "flow-sde")
    cond = policy.encode(prompts)
    with torch.no_grad():
        traj = sampler.rollout(policy, cond, noise, sigmas, torch.zeros(sigmas.numel() - 1))
    return policy.decode(traj.final)


def pipeline_images(pipe, noise, true_cfg_scale=1.0, guidance_scale=3.5):
    from diffusers import FluxPipeline

    n, c, h, w = noise.shape
    packed = FluxPipeline._pack_latents(noise.clone(), n, c, h, w)
    out = pipe(
        prompt=PROMPTS, negative_prompt="" if true_cfg_scale > 1 else None, true_cfg_scale=true_cfg_scale,
        height=32, width=32, num_inference_steps=STEPS, guidance_scale=guidance_scale,
        latents=packed, output_type="pt", max_sequence_length=16,
    )
    return out.images.float(), pipe.scheduler.sigmas.float().cpu()


@pytest.fixture(scope="module")
def pipe():
    from diffusers import FluxPipeline

    pipeline = FluxPipeline(**tiny_flux_components(seed=0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def noise_for(policy, seed=5):
    return torch.randn((len(PROMPTS), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))


def test_pack_unpack_round_trip_matches_diffusers():
    from diffusers import FluxPipeline

    x = torch.randn(2, 4, 8, 6)
    packed = pack_latents(x)
    assert torch.equal(packed, FluxPipeline._pack_latents(x, 2, 4, 8, 6))
    assert torch.equal(unpack_latents(packed, 8, 6), x)


@pytest.mark.parametrize("true_cfg_scale", [1.0, 2.5])
def test_ode_rollout_matches_flux_pipeline(pipe, true_cfg_scale):
    policy = FluxPolicy.tiny_random(seed=0, guidance_scale=true_cfg_scale, embedded_guidance_scale=3.5)
    assert isinstance(policy, Policy) and policy.latent_shape == (4, 32, 32)
    noise = noise_for(policy)
    expected, sigmas = pipeline_images(pipe, noise, true_cfg_scale=true_cfg_scale)
    # the dynamically shifted FLUX grid the pipeline sampled on (1 -> 0, T + 1 values)
    assert sigmas.shape == (STEPS + 1,) and sigmas[-1] == 0
    images = rollout_images(policy, PROMPTS, noise, sigmas)
    assert images.shape == expected.shape == (2, 3, 32, 32)
    assert (images - expected).abs().max().item() < 1e-4
    # the embedded guidance really reaches the transformer
    other = FluxPolicy.tiny_random(seed=0, guidance_scale=true_cfg_scale, embedded_guidance_scale=7.0)
    assert (rollout_images(other, PROMPTS, noise, sigmas) - expected).abs().max().item() > 1e-4


def test_lora_trains_reference_is_base_and_saved_lora_loads_into_pipeline(tmp_path):
    from diffusers import FluxPipeline

    policy = FluxPolicy.tiny_random(seed=0)
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("single_transformer_blocks" in n for n in names)  # single blocks' to_q/k/v get LoRA too
    x, sigma = noise_for(policy), torch.full((2,), 0.8)
    cond = policy.encode(PROMPTS)
    assert_only_lora_trains(policy, x, sigma, cond)

    policy.save_lora(tmp_path / "lora")
    pipeline = FluxPipeline(**tiny_flux_components(seed=0))
    pipeline.set_progress_bar_config(disable=True)
    noise = noise_for(policy, seed=9)
    before, sigmas = pipeline_images(pipeline, noise)
    pipeline.load_lora_weights(tmp_path / "lora")
    after, _ = pipeline_images(pipeline, noise)
    ours = rollout_images(policy, PROMPTS, noise, sigmas)
    assert (after - before).abs().max().item() > 1e-3
    assert (ours - after).abs().max().item() < 1e-4


def test_schnell_style_transformer_without_guidance_embedding():
    components = tiny_flux_components(seed=0)
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    components["transformer"] = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8],
        guidance_embeds=False,
    )
    policy = FluxPolicy(FluxPolicy.Config(model=None, resolution=32, max_sequence_length=16), components=components)
    with torch.no_grad():
        v = policy.velocity(noise_for(policy), torch.full((2,), 0.5), policy.encode(PROMPTS))
    assert v.shape == (2, 4, 32, 32) and v.dtype == torch.float32


class TinyFlux(FluxPolicy):
    """``flux`` on tiny random components, for runs through the full trainer (``test_policy_flux:TinyFlux``)."""

    class Config(FluxPolicy.Config):
        model: str | None = None
        resolution: int = 32
        max_sequence_length: int = 16

    def __init__(self, config: Config | None = None):
        super().__init__(config or self.Config(), components=tiny_flux_components(seed=0))


@pytest.mark.parametrize("advantage", ["sparse", "dense"])
def test_two_grpo_iterations_through_the_trainer(tmp_path, monkeypatch, advantage):
    from pathlib import Path

    from tiny_trainer import run_two_iterations

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rows = run_two_iterations("test_policy_flux:TinyFlux", advantage, tmp_path / "run", ("policy.config.lora.rank=4",))
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] > 0  # LoRA moved away from the base (the reference)
