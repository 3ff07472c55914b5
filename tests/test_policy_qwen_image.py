"""Qwen-Image policy on tiny random components: parity with diffusers' QwenImagePipeline (true CFG with
its norm rescaling, prompts of different lengths), LoRA into the plain pipeline, a full-trainer run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from densegrpo.components.policies.qwen_image import (
    QwenImagePolicy,
    qwen_image_guidance,
    tiny_qwen_image_components,
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


def pipeline_images(pipe, noise, true_cfg_scale):
    from diffusers import QwenImagePipeline

    n, c, h, w = noise.shape
    out = pipe(
        prompt=PROMPTS, negative_prompt=" " if true_cfg_scale > 1 else None, true_cfg_scale=true_cfg_scale,
        height=SIZE, width=SIZE, num_inference_steps=STEPS, latents=QwenImagePipeline._pack_latents(noise.clone(), n, c, h, w),
        output_type="pt", max_sequence_length=1024,
    )
    return out.images.float(), pipe.scheduler.sigmas.float().cpu()


def make_pipe():
    from diffusers import QwenImagePipeline

    pipeline = QwenImagePipeline(**tiny_qwen_image_components(seed=0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def noise_for(policy, seed=5):
    return torch.randn((len(PROMPTS), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("true_cfg_scale", [1.0, 4.0])
def test_ode_rollout_matches_qwen_image_pipeline(pipe, true_cfg_scale):
    policy = QwenImagePolicy.tiny_random(seed=0, guidance_scale=true_cfg_scale)
    assert isinstance(policy, Policy) and policy.latent_shape == (4, 8, 8)
    cond = policy.encode(PROMPTS)
    mask = cond.extra["prompt_embeds_mask"]
    assert mask.shape == cond.prompt_embeds.shape[:2] and mask[0].sum() < mask[1].sum()  # padded batch of two lengths
    noise = noise_for(policy)
    expected, sigmas = pipeline_images(pipe, noise, true_cfg_scale)
    assert sigmas.shape == (STEPS + 1,) and sigmas[-1] == 0
    images = rollout_images(policy, noise, sigmas)
    assert images.shape == expected.shape == (2, 3, SIZE, SIZE)
    assert (images - expected).abs().max().item() < 1e-4
    if true_cfg_scale > 1:  # guidance really changes the sample
        plain, _ = pipeline_images(pipe, noise, 1.0)
        assert (images - plain).abs().max().item() > 1e-4


def test_true_cfg_rescales_each_token_to_the_conditional_norm():
    generator = torch.Generator().manual_seed(0)
    v_negative, v_positive = torch.randn(2, 2, 4, 6, 6, generator=generator)
    guided = qwen_image_guidance(v_negative, v_positive, 4.0)
    plain = v_negative + 4.0 * (v_positive - v_negative)
    # one token is one 2x2 patch of all channels: its direction is plain CFG's, its norm the conditional one's
    patch = (slice(None), slice(None), slice(2, 4), slice(0, 2))
    assert torch.allclose(guided[patch].flatten(1).norm(dim=1), v_positive[patch].flatten(1).norm(dim=1), atol=1e-5)
    ratio = guided[patch] / plain[patch]
    assert torch.allclose(ratio, ratio.flatten(1)[:, :1, None, None].expand_as(ratio), atol=1e-5)


def test_lora_trains_reference_is_base_and_saved_lora_loads_into_pipeline(tmp_path):
    policy = QwenImagePolicy.tiny_random(seed=0, guidance_scale=1.0)
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any("img_mlp" in n for n in names) and any("add_q_proj" in n for n in names)  # FFNs and text stream, as Flow-GRPO
    x, sigma = noise_for(policy), torch.full((2,), 0.8)
    cond = policy.encode(PROMPTS)
    assert_only_lora_trains(policy, x, sigma, cond)

    policy.save_lora(tmp_path / "lora")
    pipeline = make_pipe()
    noise = noise_for(policy, seed=9)
    before, sigmas = pipeline_images(pipeline, noise, 1.0)
    pipeline.load_lora_weights(tmp_path / "lora")
    after, _ = pipeline_images(pipeline, noise, 1.0)
    ours = rollout_images(policy, noise, sigmas)
    assert (after - before).abs().max().item() > 1e-3
    assert (ours - after).abs().max().item() < 1e-4


class TinyQwenImage(QwenImagePolicy):
    """``qwen-image`` on tiny random components, for runs through the full trainer (``test_policy_qwen_image:TinyQwenImage``)."""

    class Config(QwenImagePolicy.Config):
        model: str | None = None
        resolution: int = 32
        max_sequence_length: int = 64

    def __init__(self, config: Config | None = None):
        super().__init__(config or self.Config(), components=tiny_qwen_image_components(seed=0))


@pytest.mark.parametrize("advantage", ["sparse", "dense"])
def test_two_grpo_iterations_through_the_trainer(tmp_path, monkeypatch, advantage):
    from tiny_trainer import run_two_iterations

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rows = run_two_iterations("test_policy_qwen_image:TinyQwenImage", advantage, tmp_path / "run",
                              ("policy.config.guidance_scale=2.0", "policy.config.lora.rank=4"))
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] > 0  # LoRA moved away from the base (the reference)
