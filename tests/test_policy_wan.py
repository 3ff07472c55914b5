"""Wan policy on tiny random components: parity with diffusers' WanPipeline, LoRA, frame-axis latents."""

from __future__ import annotations

import pytest
import torch
from densegrpo.components.policies.wan import WanPolicy, tiny_wan_components
from densegrpo.contracts import registry
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Policy
from lora_checks import assert_only_lora_trains

PROMPTS = ["a red circle", "two blue squares left of a cat"]
STEPS = 4
SIZE, FRAMES = 16, 5


def rollout(policy, noise, sigmas, sampler="flow-sde"):
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        return registry.load("samplers", sampler).rollout(policy, cond, noise, sigmas, torch.zeros(sigmas.numel() - 1))


def pipeline_video(pipe, noise, guidance_scale, output_type="pt"):
    out = pipe(
        prompt=PROMPTS, negative_prompt="" if guidance_scale > 1 else None, height=SIZE, width=SIZE,
        num_frames=FRAMES, num_inference_steps=STEPS, guidance_scale=guidance_scale,
        latents=noise.clone(), output_type=output_type, max_sequence_length=16,
    )
    return torch.as_tensor(out.frames).float(), pipe.scheduler.sigmas.float().cpu()


def make_pipe():
    from diffusers import WanPipeline

    pipeline = WanPipeline(**tiny_wan_components(seed=0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def pipe():
    return make_pipe()


def noise_for(policy, seed=5):
    return torch.randn((len(PROMPTS), *policy.latent_shape), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5])
def test_ode_rollout_matches_wan_pipeline(pipe, guidance_scale):
    policy = WanPolicy.tiny_random(seed=0, guidance_scale=guidance_scale)
    assert isinstance(policy, Policy) and policy.latent_shape == (16, 2, 2, 2)  # (C, F, h, w): 5 frames -> 2 latent frames
    noise = noise_for(policy)
    latents, sigmas = pipeline_video(pipe, noise, guidance_scale, output_type="latent")
    assert sigmas.shape == (STEPS + 1,) and sigmas[-1] == 0
    traj = rollout(policy, noise, sigmas)
    assert traj.latents.shape == (2, STEPS + 1, 16, 2, 2, 2)
    assert (traj.final - latents).abs().max().item() < 1e-4
    expected, _ = pipeline_video(pipe, noise, guidance_scale, output_type="pt")  # (N, F, 3, H, W)
    video = policy.decode(traj.final)
    assert video.shape == expected.shape == (2, FRAMES, 3, SIZE, SIZE)
    assert (video - expected).abs().max().item() < 1e-4
    if guidance_scale > 1:  # guidance really changes the sample
        plain, _ = pipeline_video(pipe, noise, 1.0, output_type="latent")
        assert (traj.final - plain).abs().max().item() > 1e-4


def test_sde_rollout_with_frame_axis_is_a_valid_trajectory():
    policy = WanPolicy.tiny_random(seed=0, guidance_scale=1.0)
    noise = noise_for(policy)
    sigmas = torch.linspace(1, 0, STEPS + 1)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        traj = registry.load("samplers", "flow-sde").rollout(policy, cond, noise, sigmas, torch.full((STEPS,), 0.7),
                                                              generator=torch.Generator().manual_seed(0))
        log_prob, mean = registry.load("samplers", "flow-sde").log_prob(policy, traj, 1)
    assert traj.means.shape == traj.velocities.shape == (2, STEPS, 16, 2, 2, 2)
    assert torch.allclose(log_prob, traj.log_probs[:, 1], atol=1e-5) and torch.allclose(mean, traj.means[:, 1], atol=1e-5)


def test_lora_trains_reference_is_base_and_saved_lora_loads_into_pipeline(tmp_path):
    policy = WanPolicy.tiny_random(seed=0, guidance_scale=1.0)
    assert policy.transformer.gradient_checkpointing  # the default, as Flow-GRPO; the values below are unchanged by it
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    assert any(".attn1." in n for n in names) and any(".attn2." in n for n in names)  # self- and cross-attention
    x, sigma = noise_for(policy), torch.full((2,), 0.8)
    cond = policy.encode(PROMPTS)
    assert_only_lora_trains(policy, x, sigma, cond)

    policy.save_lora(tmp_path / "lora")
    pipeline = make_pipe()
    noise = noise_for(policy, seed=9)
    before, sigmas = pipeline_video(pipeline, noise, 1.0, output_type="latent")
    pipeline.load_lora_weights(tmp_path / "lora")
    after, _ = pipeline_video(pipeline, noise, 1.0, output_type="latent")
    ours = rollout(policy, noise, sigmas).final
    assert (after - before).abs().max().item() > 1e-3
    assert (ours - after).abs().max().item() < 1e-4


def test_text_encoder_on_its_own_device_and_wan22_refused():
    policy = WanPolicy.tiny_random(seed=0, text_encoder_device="cpu")
    assert policy.pipeline.text_encoder.device == torch.device("cpu")
    assert not any(p.requires_grad for p in policy.pipeline.text_encoder.parameters())
    components = tiny_wan_components(seed=0)
    components["transformer_2"] = tiny_wan_components(seed=1)["transformer"]
    with pytest.raises(UserError, match="Wan2.2"):
        WanPolicy(WanPolicy.Config(model=None, height=SIZE, width=SIZE, num_frames=FRAMES), components=components)
    with pytest.raises(UserError, match="num_frames"):
        WanPolicy.tiny_random(seed=0, num_frames=6)


class TinyWan(WanPolicy):
    """``wan`` on tiny random components, for runs through the full trainer (``test_policy_wan:TinyWan``)."""

    class Config(WanPolicy.Config):
        model: str | None = None
        height: int = 32
        width: int = 32
        num_frames: int = 5
        max_sequence_length: int = 16

    def __init__(self, config: Config | None = None):
        super().__init__(config or self.Config(), components=tiny_wan_components(seed=0))


@pytest.mark.parametrize("advantage", ["sparse", "dense"])
def test_two_grpo_iterations_through_the_trainer_with_a_video_reward(tmp_path, monkeypatch, advantage):
    import json
    from pathlib import Path

    from densegrpo.contracts import config as cfg
    from densegrpo.run.train import run_training

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    config = cfg.resolve(None, [
        "policy.name=test_policy_wan:TinyWan",
        "policy.config.lora.rank=4",
        "policy.config.guidance_scale=1.0",
        "rewards.0.name=video-frames",
        "rewards.0.config.image_reward.name=toy-clip",
        "rewards.0.config.frames=3",
        f"advantage.name={advantage}",
        "sampling.num_steps=3",
        "sampling.eval_steps=2",
        "train.group_size=2",
        "train.groups_per_iteration=2",
        "iterations=2",
        "checkpoint_every=0",
        "logging.progress=false",
        "logging.sample_prompts=2",
        "logging.eval_prompts=2",
        "calibrator.name=uniform",
    ])
    run_training(config, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in rows] == [0, 1]
    assert all(torch.isfinite(torch.tensor([r["reward_mean"], r["policy_loss"], r["grad_norm"]])).all() for r in rows)
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] > 0  # LoRA moved away from the base (the reference)
    if advantage == "sparse":
        assert rows[0]["reward_calls"] == 4 and rows[0]["nfe_dense"] == 0  # one score per video, terminal only
    else:
        assert rows[0]["reward_calls"] > 4 and rows[0]["nfe_dense"] > 0  # intermediate states completed and scored
    assert (tmp_path / "run" / "samples" / "iter-000002.png").exists()  # video sample grid (frame strips)
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "checkpoints" / "iter-000002" / "trainable.safetensors")
    assert saved and all("lora_" in name for name in saved)  # only LoRA weights are trained and saved


def test_a_wan22_folder_and_a_missing_folder_are_one_line_errors(tmp_path):
    import json

    from densegrpo.components.policies.wan import load_wan_components

    folder = tmp_path / "wan22"
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "WanPipeline", "boundary_ratio": 0.875,
        "transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"],
    }))
    with pytest.raises(UserError, match="Wan2.2"):
        load_wan_components(WanPolicy.Config(model=str(folder)), torch.float32)
    with pytest.raises(UserError, match="cannot load"):
        load_wan_components(WanPolicy.Config(model=str(tmp_path / "absent")), torch.float32)
