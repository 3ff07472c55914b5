"""SD3 policy on tiny random components: parity with diffusers' own pipeline, LoRA, reference.

The independent truth is ``diffusers.StableDiffusion3Pipeline`` called on a second, separately
built copy of the same tiny components (same seeds): our ODE rollout (flow-SDE sampler at
noise level 0) on the scheduler's sigma grid must reproduce its decoded images.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from densegrpo.components.policies.sd3 import SD3Policy, tiny_sd3_components
from densegrpo.contracts import registry
from densegrpo.contracts.errors import UserError
from densegrpo.contracts.protocols import Policy
from densegrpo.method.sigmas import make_sigmas

PROMPTS = ["a red circle", "two blue squares left of a cat"]
STEPS = 4


def rollout_images(policy, prompts, noise, sigmas):
    """Flow-SDE sampler with noise level 0 (== Euler ODE), then decode."""
    sampler = registry.load("samplers", "flow-sde")
    cond = policy.encode(prompts)
    with torch.no_grad():
        traj = sampler.rollout(policy, cond, noise, sigmas, torch.zeros(sigmas.numel() - 1))
    return policy.decode(traj.final)


def pipeline_images(pipe, prompts, noise, guidance_scale, max_sequence_length=8):
    out = pipe(
        prompt=prompts, height=32, width=32, num_inference_steps=STEPS, guidance_scale=guidance_scale,
        latents=noise.clone(), output_type="pt", max_sequence_length=max_sequence_length,
    )
    return out.images.float()


@pytest.fixture(scope="module")
def pipe():
    from diffusers import StableDiffusion3Pipeline

    pipeline = StableDiffusion3Pipeline(**tiny_sd3_components(seed=0))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def policy():
    return SD3Policy.tiny_random(seed=0, guidance_scale=4.5)


def noise_for(policy, n=len(PROMPTS), seed=7):
    return torch.randn((n, *policy.latent_shape), generator=torch.Generator().manual_seed(seed))


def test_is_a_policy_with_frozen_base(policy):
    assert isinstance(policy, Policy)
    assert policy.latent_shape == (4, 32, 32)
    trainable = policy.trainable_parameters()
    names = [n for n, p in policy.transformer.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in names)
    assert all(not p.requires_grad for n, p in policy.transformer.named_parameters() if "lora_" not in n)
    for module in (policy.pipeline.text_encoder, policy.pipeline.text_encoder_2, policy.pipeline.vae):
        assert all(not p.requires_grad for p in module.parameters())


@pytest.mark.parametrize("guidance_scale", [4.5, 1.0])
def test_ode_rollout_matches_diffusers_pipeline(pipe, guidance_scale):
    policy = SD3Policy.tiny_random(seed=0, guidance_scale=guidance_scale)
    noise = noise_for(policy)
    expected = pipeline_images(pipe, PROMPTS, noise, guidance_scale)
    sigmas = pipe.scheduler.sigmas.float().cpu()  # the grid the pipeline just sampled on
    assert torch.allclose(sigmas, make_sigmas(STEPS, shift=3.0), atol=1e-6)
    images = rollout_images(policy, PROMPTS, noise, make_sigmas(STEPS, shift=3.0))
    assert images.shape == expected.shape == (2, 3, 32, 32)
    assert (images - expected).abs().max().item() < 1e-4
    # the check can fail: a different guidance scale moves the images
    other = SD3Policy.tiny_random(seed=0, guidance_scale=guidance_scale + 2.0)
    moved = rollout_images(other, PROMPTS, noise, make_sigmas(STEPS, shift=3.0))
    assert (moved - expected).abs().max().item() > 1e-3


def test_cfg_velocity_formula(policy):
    x = noise_for(policy)
    sigma = torch.full((2,), 0.6)
    cond = policy.encode(PROMPTS)
    unguided = SD3Policy.tiny_random(seed=0, guidance_scale=1.0)
    with torch.no_grad():
        v = policy.velocity(x, sigma, cond)
        v_pos = unguided.velocity(x, sigma, unguided.encode(PROMPTS))
        v_neg = unguided.velocity(x, sigma, unguided.encode([""] * 2))
    assert v.dtype == torch.float32
    assert torch.allclose(v, v_neg + 4.5 * (v_pos - v_neg), atol=1e-5)


def test_prompt_cache(policy):
    policy.clear_cache()
    first = policy.encode(PROMPTS)
    size = len(policy._cache)
    again = policy.encode(PROMPTS[::-1] + PROMPTS)
    assert len(policy._cache) == size == 3  # two prompts + the negative prompt
    assert torch.equal(again.prompt_embeds[2:], first.prompt_embeds)
    assert torch.equal(again.prompt_embeds[0], first.prompt_embeds[1])
    with pytest.raises(ValueError, match="list"):
        policy.encode("a red circle")


def perturb_lora(policy, seed=1, scale=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def test_reference_is_the_base_model_and_lora_trains():
    policy = SD3Policy.tiny_random(seed=0, guidance_scale=4.5)
    base = SD3Policy.tiny_random(seed=0, guidance_scale=4.5, lora={"enabled": False})
    x, sigma = noise_for(policy), torch.full((2,), 0.7)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v_base = base.velocity(x, sigma, base.encode(PROMPTS))
        assert torch.allclose(policy.velocity(x, sigma, cond), v_base, atol=1e-6)  # B = 0 at init
    frozen = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=0.5)
    for _ in range(2):
        loss = policy.velocity(x, sigma, cond).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, param in policy.transformer.named_parameters():
        if "lora_" not in name:
            assert param.grad is None and torch.equal(param, frozen[name]), name
    with torch.no_grad():
        v_lora = policy.velocity(x, sigma, cond)
        with policy.reference() as reference:
            v_ref = reference.velocity(x, sigma, cond)
        v_after = policy.velocity(x, sigma, cond)
    assert (v_lora - v_base).abs().max().item() > 1e-4
    assert torch.allclose(v_ref, v_base, atol=1e-6)
    assert torch.equal(v_after, v_lora)  # the adapter is back on after the context


def test_full_finetuning_reference_is_frozen_copy():
    policy = SD3Policy.tiny_random(seed=0, guidance_scale=1.0, lora={"enabled": False})
    assert len(policy.trainable_parameters()) == len(list(policy.transformer.parameters()))
    x, sigma = noise_for(policy), torch.full((2,), 0.5)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v0 = policy.velocity(x, sigma, cond)
        for p in policy.trainable_parameters():
            p.add_(0.01)
        with policy.reference() as reference:
            assert torch.allclose(reference.velocity(x, sigma, cond), v0, atol=1e-6)
        assert (policy.velocity(x, sigma, cond) - v0).abs().max().item() > 1e-4


def test_cfg_during_training_off_drops_guidance_inside_loss_forward_only():
    """Guidance is decided by loss_forward(), never by the gradient mode: both calls run with gradients."""
    policy = SD3Policy.tiny_random(seed=0, guidance_scale=4.5, cfg_during_training=False)
    unguided = SD3Policy.tiny_random(seed=0, guidance_scale=1.0)
    x, sigma = noise_for(policy), torch.full((2,), 0.5)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v_plain = unguided.velocity(x, sigma, unguided.encode(PROMPTS))
        v_neg = unguided.velocity(x, sigma, unguided.encode([""] * 2))
    v_guided = v_neg + 4.5 * (v_plain - v_neg)
    assert (v_guided - v_plain).abs().max().item() > 1e-4  # the two cases can be told apart
    assert torch.is_grad_enabled()
    v_outside = policy.velocity(x, sigma, cond)
    with policy.loss_forward():
        v_inside = policy.velocity(x, sigma, cond)
        with policy.reference() as reference:
            v_ref_inside = reference.velocity(x, sigma, cond)
    assert v_outside.requires_grad and v_inside.requires_grad
    assert torch.allclose(v_inside.detach(), v_plain, atol=1e-6)
    assert torch.allclose(v_outside.detach(), v_guided, atol=1e-5)
    assert torch.allclose(v_ref_inside, v_plain, atol=1e-6)  # B = 0 at init: reference = base
    with torch.no_grad(), policy.reference() as reference:
        v_ref_outside = reference.velocity(x, sigma, cond)  # reference() alone keeps guidance
    assert torch.allclose(v_ref_outside, v_guided, atol=1e-5)
    with policy.loss_forward():
        with policy.loss_forward():
            pass
        assert torch.allclose(policy.velocity(x, sigma, cond).detach(), v_plain, atol=1e-6)  # nesting keeps the context
    assert torch.allclose(policy.velocity(x, sigma, cond).detach(), v_guided, atol=1e-5)  # restored on exit


def test_cfg_during_training_on_keeps_guidance_in_loss_forward(policy):
    x, sigma = noise_for(policy), torch.full((2,), 0.5)
    cond = policy.encode(PROMPTS)
    with torch.no_grad():
        v_rollout = policy.velocity(x, sigma, cond)
    with policy.loss_forward():
        v_loss = policy.velocity(x, sigma, cond)
    assert torch.equal(v_loss.detach(), v_rollout)


@pytest.mark.parametrize("cfg_grad", ["conditional", "both"])
def test_cfg_grad_inside_loss_forward_matches_the_hand_written_guidance(cfg_grad):
    """Flow-GRPO's compute_log_prob: v = v_neg.detach() + g (v_pos - v_neg.detach()) ("conditional");
    "both" keeps v_neg attached. Same values, gradients of a scalar of v compared by parameter."""
    policy = SD3Policy.tiny_random(seed=0, guidance_scale=4.5, cfg_during_training=True)
    params = policy.trainable_parameters()
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # LoRA's B starts at 0, which would zero every A gradient
        for p in params:
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    x, sigma = noise_for(policy), torch.full((2,), 0.5)
    cond = policy.encode(PROMPTS)
    weight = torch.randn(x.shape, generator=generator)

    def grads(v):
        return torch.autograd.grad((v * weight).sum(), params, retain_graph=True)

    with policy.loss_forward(cfg_grad=cfg_grad):
        v_loss = policy.velocity(x, sigma, cond)
    got = grads(v_loss)
    v_pos = policy.velocity(x, sigma, replace(cond, negative=None))  # cond.negative None: one unguided branch
    v_neg = policy.velocity(x, sigma, cond.negative)
    hand = {
        "conditional": v_neg.detach() + 4.5 * (v_pos - v_neg.detach()),
        "both": v_neg + 4.5 * (v_pos - v_neg),
    }
    assert torch.allclose(v_loss.detach(), hand[cfg_grad].detach(), atol=1e-5)
    expected = grads(hand[cfg_grad])
    other = grads(hand["both" if cfg_grad == "conditional" else "conditional"])
    scale = max(float(g.abs().max()) for g in expected)
    assert all(torch.allclose(a, b, atol=1e-4 * scale) for a, b in zip(got, expected))
    gap = max(float((a - b).abs().max()) for a, b in zip(expected, other))
    assert gap > 1e-2 * scale  # the two forms differ: the test can fail


def test_cond_select_and_repeat_carry_the_negative(policy):
    cond = policy.encode(PROMPTS)
    assert cond.negative is not None and cond.negative.negative is None
    assert cond.negative.prompt_embeds.shape == cond.prompt_embeds.shape
    assert cond.negative.pooled_embeds.shape == cond.pooled_embeds.shape
    repeated = cond.repeat(3)
    assert len(repeated) == len(repeated.negative) == 6
    picked = repeated.select([4, 1])
    assert picked.prompts == [PROMPTS[0], PROMPTS[1]] and len(picked.negative) == 2
    assert torch.equal(picked.negative.prompt_embeds, cond.negative.prompt_embeds[[0, 1]])
    assert SD3Policy.tiny_random(seed=0, guidance_scale=1.0).encode(PROMPTS).negative is None


def test_saved_lora_loads_into_diffusers_pipeline(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    policy = SD3Policy.tiny_random(seed=0, guidance_scale=4.5)
    perturb_lora(policy)
    path = policy.save_lora(tmp_path / "lora")
    assert path.exists()
    noise = noise_for(policy)
    pipeline = StableDiffusion3Pipeline(**tiny_sd3_components(seed=0))
    pipeline.set_progress_bar_config(disable=True)
    before = pipeline_images(pipeline, PROMPTS, noise, 4.5)
    pipeline.load_lora_weights(tmp_path / "lora")
    after = pipeline_images(pipeline, PROMPTS, noise, 4.5)
    ours = rollout_images(policy, PROMPTS, noise, make_sigmas(STEPS, shift=3.0))
    assert (after - before).abs().max().item() > 1e-3  # the LoRA changes the pipeline's output
    assert (ours - after).abs().max().item() < 1e-4  # ... into exactly what the policy samples

    reloaded = SD3Policy.tiny_random(seed=0, guidance_scale=4.5)
    reloaded.load_lora(tmp_path / "lora")
    state, expected = reloaded.trainable_state_dict(), policy.trainable_state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)


def test_trainable_state_dict_round_trip():
    policy = SD3Policy.tiny_random(seed=0)
    perturb_lora(policy, seed=3)
    state = policy.trainable_state_dict()
    fresh = SD3Policy.tiny_random(seed=0)
    fresh.load_trainable_state_dict(state)
    assert all(torch.equal(fresh.trainable_state_dict()[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="same lora"):
        fresh.load_trainable_state_dict({"nope": torch.zeros(1)})


def test_bfloat16_weights_give_float32_velocities():
    policy = SD3Policy.tiny_random(seed=0, dtype="bfloat16", guidance_scale=4.5)
    assert policy.transformer.dtype == torch.bfloat16 or next(policy.transformer.parameters()).dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.trainable_parameters())
    with torch.no_grad():
        v = policy.velocity(noise_for(policy), torch.full((2,), 0.5), policy.encode(PROMPTS))
    assert v.dtype == torch.float32 and torch.isfinite(v).all()


def test_missing_weights_raise_one_line_user_error(tmp_path):
    with pytest.raises(UserError, match="local folder") as info:
        SD3Policy(SD3Policy.Config(model=str(tmp_path / "no-such-model")))
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="stable-diffusion"):
        SD3Policy(SD3Policy.Config())  # hub id, offline: fails at once instead of downloading


def test_hub_load_passes_local_files_only_and_leaves_the_environment_alone(monkeypatch):
    import os

    from densegrpo.components.policies.adapter import hub_load

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    seen = []

    def loader(model, **kwargs):
        seen.append((os.environ.get("HF_HUB_OFFLINE"), kwargs))
        raise OSError("org/model is not cached\nsecond line")

    with pytest.raises(UserError, match="local folder") as info:
        hub_load(loader, "SD3 VAE", "org/model", subfolder="vae", local_files_only=True)
    assert seen == [(None, {"subfolder": "vae", "local_files_only": True})]
    assert "\n" not in str(info.value) and "'org/model/vae'" in str(info.value)
    assert "HF_HUB_OFFLINE" not in os.environ


def test_folder_without_t5_loads(tmp_path):
    components = tiny_sd3_components(seed=0)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        components[name].save_pretrained(tmp_path / name)
    policy = SD3Policy(SD3Policy.Config(model=str(tmp_path), resolution=32, max_sequence_length=8))
    assert policy.pipeline.text_encoder_3 is None
    cond = policy.encode(PROMPTS)
    assert cond.prompt_embeds.shape == (2, 77 + 8, 64)
    assert torch.count_nonzero(cond.prompt_embeds[:, 77:]) == 0  # T5 tokens are zeros without T5


@pytest.mark.parametrize("method", ["flow-grpo", "densegrpo"])
@pytest.mark.parametrize("task", ["pickscore", "geneval", "ocr"])
def test_sd35m_recipes_validate(method, task):
    from pathlib import Path

    from densegrpo.contracts.config import resolve

    path = Path(__file__).resolve().parents[1] / "configs" / "recipes" / f"{method}-sd35m-{task}.yaml"
    config = resolve(path)
    assert config.policy.name == "sd3"
    SD3Policy.Config.model_validate(config.policy.config)  # the policy options are valid too
    policy = config.policy.config
    assert policy["guidance_scale"] == 4.5 and policy["lora"]["rank"] == 32 and policy["lora"]["alpha"] == 64
    train = config.train
    assert (train.group_size, train.learning_rate, train.weight_decay) == (24, 3e-4, 1e-4)
    assert (train.clip_range, train.advantage_clip, train.timestep_fraction) == (1e-4, 5.0, 0.99)
    assert train.beta == (0.01 if task == "pickscore" else 0.04)
    assert (config.sampling.num_steps, config.sampling.eval_steps) == (10, 40)
    assert config.advantage.name == ("dense" if method == "densegrpo" else "sparse")


class TinySD3(SD3Policy):
    """``sd3`` on tiny random components, for runs through the full trainer (``test_policy_sd3:TinySD3``)."""

    class Config(SD3Policy.Config):
        model: str | None = None
        resolution: int = 32
        max_sequence_length: int = 8

    def __init__(self, config: Config | None = None):
        from diffusers import AutoencoderKL

        components = tiny_sd3_components(seed=0)
        # a VAE that halves the size: 32 px images (toy-clip's minimum) from 16 x 16 = 256 latent tokens, a run of seconds
        torch.manual_seed(1)
        components["vae"] = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
            block_out_channels=(4, 4), layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
            use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
        ).eval()
        super().__init__(config or self.Config(), components=components)


@pytest.mark.parametrize("advantage", ["sparse", "dense"])
def test_two_grpo_iterations_through_the_trainer(tmp_path, monkeypatch, advantage):
    from pathlib import Path

    from tiny_trainer import run_two_iterations

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    rows = run_two_iterations("test_policy_sd3:TinySD3", advantage, tmp_path / "run",
                              ("policy.config.lora.rank=4", "policy.config.guidance_scale=2.0"))
    assert rows[0]["grad_norm"] > 0 and rows[1]["kl"] > 0  # LoRA moved away from the base (the reference)
