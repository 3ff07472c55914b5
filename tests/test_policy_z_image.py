"""Z-Image policy on tiny random components: parity with diffusers' ZImagePipeline (its CFG, prompts of
different lengths, negated velocity at t = 1 - sigma), LoRA into the plain pipeline, a full-trainer run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from densegrpo.components.policies.z_image import ZImagePolicy, tiny_z_image_components
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
    out = pipe(  # a copy of the prompts: ZImagePipeline writes the chat-templated prompts into the list it is given
        prompt=list(PROMPTS), guidance_scale=guidance_scale, height=SIZE, width=SIZE, num_inference_steps=STEPS,
        latents=noise.clone(), output_type="pt", max_sequence_length=32,
    )
    return out.images.float(), pipe.scheduler.sigmas.float().cpu()


def make_pipe():
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline(**tiny_z_image_components(seed=0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def noise_for(policy, seed=5):
    return torch.randn((len(PROMPTS), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance_scale", [0.0, 3.0])
def test_ode_rollout_matches_z_image_pipeline(pipe, guidance_scale):
    policy = ZImagePolicy.tiny_random(seed=0, guidance_scale=guidance_scale)
    assert isinstance(policy, Policy) and policy.latent_shape == (16, 16, 16)
    cond = policy.encode(PROMPTS)
    mask = cond.extra["prompt_embeds_mask"]
    assert mask[0].sum() < mask[1].sum()  # two lengths in one padded batch
    assert (cond.negative is not None) == (guidance_scale > 0)  # ZImagePipeline guides for every scale > 0
    noise = noise_for(policy)
    expected, sigmas = pipeline_images(pipe, noise, guidance_scale)
    assert sigmas.shape == (STEPS + 1,) and sigmas[-1] == 0
    images = rollout_images(policy, noise, sigmas)
    assert images.shape == expected.shape == (2, 3, SIZE, SIZE)
    assert (images - expected).abs().max().item() < 1e-4
    if guidance_scale > 0:  # guidance really changes the sample
        plain, _ = pipeline_images(pipe, noise, 0.0)
        assert (images - plain).abs().max().item() > 1e-4


def test_lora_trains_reference_is_base_and_saved_lora_loads_into_pipeline(tmp_path):
    policy = ZImagePolicy.tiny_random(seed=0, guidance_scale=0.0)
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("feed_forward.w2" in n for n in names) and any("refiner" in n for n in names)  # FFNs and refiners, as Flow-Factory
    x, sigma = noise_for(policy), torch.full((2,), 0.8)
    cond = policy.encode(PROMPTS)
    assert_only_lora_trains(policy, x, sigma, cond)

    policy.save_lora(tmp_path / "lora")
    pipeline = make_pipe()
    noise = noise_for(policy, seed=9)
    before, sigmas = pipeline_images(pipeline, noise, 0.0)
    pipeline.load_lora_weights(tmp_path / "lora")
    after, _ = pipeline_images(pipeline, noise, 0.0)
    ours = rollout_images(policy, noise, sigmas)
    assert (after - before).abs().max().item() > 1e-3
    assert (ours - after).abs().max().item() < 1e-4


class TinyZImage(ZImagePolicy):
    """``z-image`` on tiny random components, for runs through the full trainer (``test_policy_z_image:TinyZImage``)."""

    class Config(ZImagePolicy.Config):
        model: str | None = None
        resolution: int = 32
        max_sequence_length: int = 32

    def __init__(self, config: Config | None = None):
        super().__init__(config or self.Config(), components=tiny_z_image_components(seed=0))


@pytest.mark.parametrize("advantage", ["sparse", "dense"])
def test_two_grpo_iterations_through_the_trainer(tmp_path, monkeypatch, advantage):
    from tiny_trainer import run_two_iterations

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rows = run_two_iterations("test_policy_z_image:TinyZImage", advantage, tmp_path / "run",
                              ("policy.config.guidance_scale=2.0", "policy.config.lora.rank=4"))
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] > 0  # LoRA moved away from the base (the reference)
