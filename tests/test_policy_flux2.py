"""FLUX.2 policy on tiny random components: parity with diffusers' Flux2Pipeline (embedded guidance),
LoRA into the plain pipeline, a full-trainer run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from densegrpo.components.policies.flux2 import (
    Flux2Policy,
    pack_tokens,
    tiny_flux2_components,
    unpack_tokens,
)
from densegrpo.contracts import registry
from densegrpo.contracts.protocols import Policy
from lora_checks import assert_only_lora_trains

PROMPTS = ["a red circle", "two blue squares left of a cat"]
STEPS = 4
SIZE = 32


def rollout_images(policy, noise, sigmas):
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        traj = registry.load("samplers", "flow-sde").rollout(policy, cond, noise, sigmas, torch.zeros(sigmas.numel() - 1))
    return policy.decode(traj.final)


def pipeline_images(pipe, noise, guidance_scale):
    out = pipe(
        prompt=PROMPTS, guidance_scale=guidance_scale, height=SIZE, width=SIZE, num_inference_steps=STEPS,
        latents=noise.clone(), output_type="pt", max_sequence_length=256, text_encoder_out_layers=(1,),
    )
    return out.images.float(), pipe.scheduler.sigmas.float().cpu()


def make_pipe():
    from diffusers import Flux2Pipeline

    pipeline = Flux2Pipeline(**tiny_flux2_components(seed=0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def noise_for(policy, seed=5):
    return torch.randn((len(PROMPTS), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))


def test_token_packing_matches_diffusers():
    from diffusers import Flux2Pipeline

    x = torch.randn(2, 16, 4, 6)
    assert torch.equal(pack_tokens(x), Flux2Pipeline._pack_latents(x))
    assert torch.equal(unpack_tokens(pack_tokens(x), 4, 6), x)


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_ode_rollout_matches_flux2_pipeline(pipe, guidance_scale):
    policy = Flux2Policy.tiny_random(seed=0, guidance_scale=guidance_scale)
    assert isinstance(policy, Policy) and policy.latent_shape == (16, 8, 8)  # 4 VAE channels x 2x2, 32 px / 4
    cond = policy.encode(PROMPTS)
    assert cond.negative is None  # embedded guidance: one pass, no negative prompt
    assert not torch.equal(cond.prompt_embeds[0], cond.prompt_embeds[1])  # the prompts survive the template's truncation
    noise = noise_for(policy)
    expected, sigmas = pipeline_images(pipe, noise, guidance_scale)
    assert sigmas.shape == (STEPS + 1,) and sigmas[-1] == 0
    images = rollout_images(policy, noise, sigmas)
    assert images.shape == expected.shape == (2, 3, SIZE, SIZE)
    assert (images - expected).abs().max().item() < 1e-4
    if guidance_scale > 1:  # the embedded guidance really reaches the transformer
        plain, _ = pipeline_images(pipe, noise, 1.0)
        assert (images - plain).abs().max().item() > 1e-4


def test_lora_trains_reference_is_base_and_saved_lora_loads_into_pipeline(tmp_path):
    policy = Flux2Policy.tiny_random(seed=0)
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("single_transformer_blocks" in n and "to_qkv_mlp_proj" in n for n in names)  # single blocks too
    assert any("ff_context.linear_in" in n for n in names)
    x, sigma = noise_for(policy), torch.full((2,), 0.8)
    cond = policy.encode(PROMPTS)
    assert_only_lora_trains(policy, x, sigma, cond)

    policy.save_lora(tmp_path / "lora")
    pipeline = make_pipe()
    noise = noise_for(policy, seed=9)
    before, sigmas = pipeline_images(pipeline, noise, 4.0)
    pipeline.load_lora_weights(tmp_path / "lora")
    after, _ = pipeline_images(pipeline, noise, 4.0)
    ours = rollout_images(policy, noise, sigmas)
    assert (after - before).abs().max().item() > 1e-3
    assert (ours - after).abs().max().item() < 1e-4


class TinyFlux2(Flux2Policy):
    """``flux2`` on tiny random components, for runs through the full trainer (``test_policy_flux2:TinyFlux2``)."""

    class Config(Flux2Policy.Config):
        model: str | None = None
        resolution: int = 32
        max_sequence_length: int = 256
        text_encoder_out_layers: list[int] = [1]

    def __init__(self, config: Config | None = None):
        super().__init__(config or self.Config(), components=tiny_flux2_components(seed=0))


@pytest.mark.parametrize("advantage", ["sparse", "dense"])
def test_two_grpo_iterations_through_the_trainer(tmp_path, monkeypatch, advantage):
    from tiny_trainer import run_two_iterations

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rows = run_two_iterations("test_policy_flux2:TinyFlux2", advantage, tmp_path / "run", ("policy.config.lora.rank=4",))
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] > 0  # LoRA moved away from the base (the reference)
