"""The diffusers policies at scale, on tiny random components: gradient checkpointing, the bounded
CPU prompt cache, text encoders on their own device, mixed precision (autocast, VAE dtype) and TF32.

Independent truths: the same computation without the option (checkpointing: the stored-activation
backward; the cache: each prompt encoded on its own, straight from the encoder; autocast: the float32
model), a hand-kept LRU order, and the hook-observed dtypes and call counts.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from densegrpo.components.policies.adapter import PromptCache
from densegrpo.components.policies.flux import FluxPolicy
from densegrpo.components.policies.sd3 import SD3Policy
from densegrpo.components.policies.z_image import ZImagePolicy
from densegrpo.contracts.protocols import Cond

PROMPTS = ["a red circle", "two blue squares left of a cat"]
POLICIES = {
    "sd3": (SD3Policy, {"guidance_scale": 4.5}, "transformer_blocks"),
    "flux": (FluxPolicy, {"guidance_scale": 2.0}, "transformer_blocks"),
    "z-image": (ZImagePolicy, {"guidance_scale": 3.0}, "layers"),
}


def build(cls, **options):
    """``cls.tiny_random(seed=0, **options)`` with the global RNG reset first: peft draws LoRA-A from it, and
    policies compared with each other must start from the same weights."""
    torch.manual_seed(0)
    return cls.tiny_random(seed=0, **options)


def noise_for(policy, n=len(PROMPTS), seed=7):
    return torch.randn((n, *policy.latent_shape), generator=torch.Generator().manual_seed(seed))


def perturb_lora(policy, seed=1, scale=0.3):
    """LoRA B starts at 0, which would zero every A gradient: push every LoRA weight off its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn(param.shape, generator=generator) * scale)


# ----------------------------------------------------------------------------- prompt cache


def counting_encoder():
    """``encode`` of a deterministic fake text encoder (rows from the prompt's characters), with the prompts it saw."""
    seen: list[str] = []

    def encode(prompts: list[str]) -> Cond:
        seen.extend(prompts)
        rows = [torch.tensor([float(len(p)), float(sum(map(ord, p)) % 97), 1.0]) for p in prompts]
        embeds = torch.stack(rows)[:, None, :].repeat(1, 2, 1)  # (N, 2, 3)
        return Cond(prompt_embeds=embeds, pooled_embeds=embeds[:, 0] * 2, prompts=list(prompts),
                    extra={"mask": torch.ones(len(prompts), 2, dtype=torch.long)})

    return encode, seen


def straight(prompts: list[str]) -> Cond:
    """The truth: every prompt encoded on its own, no cache."""
    encode, _ = counting_encoder()
    rows = [encode([p]) for p in prompts]
    return Cond(prompt_embeds=torch.cat([r.prompt_embeds for r in rows]), pooled_embeds=torch.cat([r.pooled_embeds for r in rows]),
                prompts=list(prompts), extra={"mask": torch.cat([r.extra["mask"] for r in rows])})


def test_prompt_cache_is_a_bounded_lru_with_the_straight_encodings():
    encode, seen = counting_encoder()
    cache = PromptCache(encode, max_prompts=3)
    calls = [(["a", "b", "a"], ""), (["c"], ""), (["b"], ""), (["a", "d"], None), (["b", "c", "e", "f"], None)]
    # the LRU order kept by hand, least recently used first; a call uses its prompts in first-seen order, then the negative
    expected_order = [["a", "b", ""], ["b", "c", ""], ["c", "b", ""], ["", "a", "d"], ["c", "e", "f"]]
    expected_encoded = [["a", "b", ""], ["c"], [], ["a", "d"], ["b", "c", "e", "f"]]
    for (prompts, negative), order, encoded in zip(calls, expected_order, expected_encoded):
        before = len(seen)
        cond = cache(prompts, negative)
        assert seen[before:] == encoded  # only prompts not held are encoded, once each
        assert cache.prompts() == order and len(cache) == len(order) <= 3
        truth = straight(prompts)
        assert cond.prompts == prompts
        assert torch.equal(cond.prompt_embeds, truth.prompt_embeds) and torch.equal(cond.pooled_embeds, truth.pooled_embeds)
        assert torch.equal(cond.extra["mask"], truth.extra["mask"])
        if negative is None:
            assert cond.negative is None
        else:
            assert torch.equal(cond.negative.prompt_embeds, straight([negative] * len(prompts)).prompt_embeds)
    held = [cache._rows[p] for p in cache.prompts()]
    assert all(r.prompt_embeds.device.type == "cpu" and r.extra["mask"].device.type == "cpu" for r in held)
    assert all(r.negative is None and r.prompt_embeds.shape[0] == 1 for r in held)  # one row per prompt, nothing stacked


def test_prompt_cache_of_size_zero_keeps_nothing_and_still_answers():
    encode, seen = counting_encoder()
    cache = PromptCache(encode, max_prompts=0)
    first = cache(["a", "b"], "")
    again = cache(["a", "b"], "")
    assert len(cache) == 0 and seen == ["a", "b", "", "a", "b", ""]
    assert torch.equal(first.prompt_embeds, again.prompt_embeds) and torch.equal(first.negative.prompt_embeds, again.negative.prompt_embeds)
    with pytest.raises(ValueError, match="max_prompts"):
        PromptCache(encode, max_prompts=-1)


def test_prompt_cache_hands_rows_over_on_its_device():
    """The cache holds CPU rows and returns them on the device it serves ('meta' stands in for a GPU here)."""
    encode, _ = counting_encoder()
    cache = PromptCache(encode, max_prompts=4, device="meta")
    cond = cache(["a", "b", "a"], "")
    for tensor in (cond.prompt_embeds, cond.pooled_embeds, cond.extra["mask"], cond.negative.prompt_embeds):
        assert tensor.device.type == "meta"
    assert cond.prompt_embeds.shape == (3, 2, 3) and cond.negative.pooled_embeds.shape == (3, 3)
    assert all(cache._rows[p].prompt_embeds.device.type == "cpu" for p in cache.prompts())


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_text_encoders_on_their_own_device_embeddings_on_the_policy_device(name):
    """``text_encoder_device: cpu`` with the policy on another device ('meta', a stand-in for the GPU): the text
    encoders stay on the CPU, the cache holds CPU rows equal to an all-CPU policy's, and ``encode`` answers on
    the policy's device."""
    cls, options, _ = POLICIES[name]
    on_cpu = build(cls, **options)
    split = build(cls, device="meta", text_encoder_device="cpu", **options)
    encoders = [m for m in (split.pipeline.text_encoder, split.pipeline.text_encoder_2) if m is not None]
    assert encoders and all(p.device.type == "cpu" and not p.requires_grad for m in encoders for p in m.parameters())
    assert next(split.transformer.parameters()).device.type == "meta"
    cond = split.encode(PROMPTS)
    truth = on_cpu.encode(PROMPTS)
    assert cond.prompt_embeds.device.type == cond.pooled_embeds.device.type == "meta"
    assert cond.prompt_embeds.shape == truth.prompt_embeds.shape
    if name == "sd3":  # guidance 4.5 with the empty negative prompt
        assert cond.negative.prompt_embeds.device.type == "meta"
    for prompt in PROMPTS:
        held, expected = split._cache._rows[prompt], on_cpu._cache._rows[prompt]
        assert held.prompt_embeds.device.type == "cpu"
        assert torch.equal(held.prompt_embeds, expected.prompt_embeds) and torch.equal(held.pooled_embeds, expected.pooled_embeds)
    default = build(cls, **options)  # text_encoder_device unset: the policy's device, as before
    assert all(p.device.type == "cpu" for p in default.pipeline.text_encoder.parameters())


def test_the_policy_cache_is_bounded_by_prompt_cache_size():
    policy = build(SD3Policy, guidance_scale=4.5, prompt_cache_size=2)
    cond = policy.encode(PROMPTS + ["a photo of a dog"])
    assert policy._cache.prompts() == ["a photo of a dog", ""]  # the two used last: the third prompt, then the negative
    truth = build(SD3Policy, guidance_scale=4.5).encode(PROMPTS + ["a photo of a dog"])
    assert torch.equal(cond.prompt_embeds, truth.prompt_embeds) and torch.equal(cond.negative.prompt_embeds, truth.negative.prompt_embeds)
    assert SD3Policy.Config().prompt_cache_size == 1024


# ----------------------------------------------------------------------------- gradient checkpointing


def count_calls(module: torch.nn.Module) -> list[int]:
    """Counts ``module.forward`` calls (the checkpoint's recomputation runs ``forward`` without firing module hooks)."""
    calls: list[int] = []
    forward = module.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    module.forward = counted
    return calls


@pytest.mark.parametrize("name", list(POLICIES))
def test_gradient_checkpointing_recomputes_blocks_with_the_same_loss_and_gradients(name):
    """CFG in the loss (v_neg detached, as Flow-GRPO) and the KL reference pass: with checkpointing each block runs
    again in the backward pass (twice the forward calls), and loss and LoRA gradients equal the stored-activation ones."""
    cls, options, blocks = POLICIES[name]
    results = {}
    for checkpointing in (False, True):
        policy = build(cls, gradient_checkpointing=checkpointing, **options)
        assert policy.transformer.gradient_checkpointing is checkpointing
        perturb_lora(policy)
        calls = count_calls(getattr(policy.transformer, blocks)[0])
        x, sigma = noise_for(policy), torch.full((len(PROMPTS),), 0.6)
        cond = policy.encode(PROMPTS)
        weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
        with policy.loss_forward(cfg_grad="conditional"):
            v = policy.velocity(x, sigma, cond)
            with torch.no_grad(), policy.reference() as reference:
                v_ref = reference.velocity(x, sigma, cond)
        loss = (v * weight).mean() + (v - v_ref).pow(2).mean()
        forward_calls = len(calls)
        loss.backward()
        params = policy.trainable_parameters()
        assert params and all(p.grad is not None and p.dtype == torch.float32 for p in params)
        results[checkpointing] = (loss.detach(), [p.grad.clone() for p in params], forward_calls, len(calls) - forward_calls)
    (loss0, grads0, fwd0, bwd0), (loss1, grads1, fwd1, bwd1) = results[False], results[True]
    assert fwd0 == fwd1 == 2 and bwd0 == 0 and bwd1 == 1  # the gradient-carrying call is recomputed, the reference is not
    assert torch.equal(loss0, loss1)
    scale = max(float(g.abs().max()) for g in grads0)
    assert scale > 0
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-6 * scale) for a, b in zip(grads0, grads1))


def test_gradient_checkpointing_defaults():
    from densegrpo.components.policies.flux2 import Flux2Policy
    from densegrpo.components.policies.qwen_image import QwenImagePolicy
    from densegrpo.components.policies.wan import WanPolicy

    defaults = {cls.__name__: cls.Config.model_fields["gradient_checkpointing"].default
                for cls in (SD3Policy, FluxPolicy, ZImagePolicy, QwenImagePolicy, Flux2Policy, WanPolicy)}
    # off unless the model's Flow-GRPO trainer turns it on (Qwen-Image, Wan2.1): today's behaviour stays the default
    assert defaults == {"SD3Policy": False, "FluxPolicy": False, "ZImagePolicy": False, "QwenImagePolicy": True,
                        "Flux2Policy": False, "WanPolicy": True}


# ----------------------------------------------------------------------------- precision


def lora_output_dtypes(policy) -> list[torch.dtype]:
    """Records the output dtype of every LoRA-B projection of ``policy``'s transformer."""
    seen: list[torch.dtype] = []
    for name, module in policy.transformer.named_modules():
        if name.endswith("lora_B.default"):
            module.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    return seen


def test_autocast_runs_lora_in_bfloat16_over_float32_master_weights():
    # unguided: CFG 4.5 would amplify bf16's rounding (v_pos - v_neg times 4.5) past a useful tolerance
    reference = build(SD3Policy, guidance_scale=1.0)  # float32 throughout: the truth
    mixed = build(SD3Policy, guidance_scale=1.0, dtype="bfloat16", autocast=True)
    plain = build(SD3Policy, guidance_scale=1.0, dtype="bfloat16")  # autocast off: today's float32 LoRA
    for policy in (reference, mixed, plain):
        perturb_lora(policy, scale=0.1)
    x, sigma = noise_for(reference), torch.full((len(PROMPTS),), 0.6)
    outputs = {}
    for label, policy in (("reference", reference), ("mixed", mixed), ("plain", plain)):
        dtypes = lora_output_dtypes(policy)
        with policy.loss_forward():
            v = policy.velocity(x, sigma, policy.encode(PROMPTS))
        v.pow(2).mean().backward()
        params = policy.trainable_parameters()
        assert v.dtype == torch.float32 and torch.isfinite(v).all()
        assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32 for p in params)
        assert all(torch.isfinite(p.grad).all() for p in params)
        outputs[label] = (v.detach(), set(dtypes))
    assert outputs["mixed"][1] == {torch.bfloat16}  # LoRA computes in the model's dtype under autocast
    assert outputs["plain"][1] == outputs["reference"][1] == {torch.float32}  # without it, LoRA runs in float32
    truth = outputs["reference"][0]
    for label in ("mixed", "plain"):  # both are bf16 approximations of the float32 model (measured: 0.9% each)
        error = (outputs[label][0] - truth).norm() / truth.norm()
        assert 0 < error < 2e-2, (label, float(error))


def test_autocast_changes_nothing_in_float32():
    """The toy policies run float32: autocast must leave them bit-identical (it is skipped)."""
    on = build(SD3Policy, guidance_scale=4.5, autocast=True)
    off = build(SD3Policy, guidance_scale=4.5)
    for policy in (on, off):
        perturb_lora(policy)
    x, sigma = noise_for(on), torch.full((len(PROMPTS),), 0.4)
    with torch.no_grad():
        assert torch.equal(on.velocity(x, sigma, on.encode(PROMPTS)), off.velocity(x, sigma, off.encode(PROMPTS)))


def decoder_input_dtypes(policy) -> list[torch.dtype]:
    seen: list[torch.dtype] = []
    policy.pipeline.vae.decoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].dtype))
    return seen


def test_vae_dtype_sets_the_decode_dtype():
    latents = torch.randn((2, 4, 32, 32), generator=torch.Generator().manual_seed(4))
    fp32 = build(SD3Policy)
    images = fp32.decode(latents)
    cases = {
        "bf16 VAE under fp32 weights": (dict(vae_dtype="bfloat16"), torch.bfloat16),
        "fp32 VAE under bf16 weights": (dict(dtype="bfloat16", vae_dtype="float32"), torch.float32),
        "unset: the weights' dtype": (dict(dtype="bfloat16"), torch.bfloat16),
    }
    for label, (options, dtype) in cases.items():
        policy = build(SD3Policy, **options)
        seen = decoder_input_dtypes(policy)
        decoded = policy.decode(latents)
        assert policy.pipeline.vae.dtype == dtype and seen == [dtype], label
        assert decoded.dtype == torch.float32 and decoded.shape == images.shape, label
        if dtype == torch.float32:
            assert torch.equal(decoded, images), label  # the same float32 VAE decodes bit for bit
        else:
            gap = (decoded - images).abs().max().item()
            assert 0 < gap < 5e-2, (label, gap)


def test_vae_dtype_defaults():
    from densegrpo.components.policies.flux2 import Flux2Policy
    from densegrpo.components.policies.qwen_image import QwenImagePolicy
    from densegrpo.components.policies.wan import WanPolicy

    assert SD3Policy.Config().vae_dtype is None and FluxPolicy.Config().vae_dtype is None  # today's: the weights' dtype
    for cls in (QwenImagePolicy, Flux2Policy, WanPolicy, ZImagePolicy):
        assert cls.Config().vae_dtype == "float32", cls.__name__  # today's: kept in float32


@pytest.mark.parametrize("tf32", [True, False])
def test_the_run_sets_tf32(tmp_path, monkeypatch, tf32):
    from densegrpo.contracts import config as cfg
    from densegrpo.run.state import Run

    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    # start from the opposite, and let monkeypatch restore the process's flags afterwards
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", not tf32)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not tf32)
    config = cfg.resolve(None, ["policy.name=loop_components:AnalyticPolicy", "rewards.0.name=loop_components:BrightnessReward",
                                "logging.progress=false", f"tf32={str(tf32).lower()}"])
    Run(config, tmp_path)
    assert torch.backends.cuda.matmul.allow_tf32 is tf32 and torch.backends.cudnn.allow_tf32 is tf32


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_on_cuda_bf16_autocast_cached_rows_on_the_cpu_and_encoders_off_the_gpu():
    policy = build(SD3Policy, guidance_scale=4.5, device="cuda", dtype="bfloat16", autocast=True,
                                   text_encoder_device="cpu", gradient_checkpointing=True, vae_dtype="float32")
    assert all(p.device.type == "cpu" for p in policy.pipeline.text_encoder.parameters())
    cond = policy.encode(PROMPTS)
    assert cond.prompt_embeds.device.type == "cuda" and cond.negative.prompt_embeds.device.type == "cuda"
    assert all(policy._cache._rows[p].prompt_embeds.device.type == "cpu" for p in policy._cache.prompts())
    perturb_lora(policy)
    x = noise_for(policy).cuda()
    dtypes = lora_output_dtypes(policy)
    with policy.loss_forward():
        v = policy.velocity(x, torch.full((2,), 0.6, device="cuda"), cond)
    v.pow(2).mean().backward()
    assert v.dtype == torch.float32 and set(dtypes) == {torch.bfloat16}
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in policy.trainable_parameters())
    images = policy.decode(x.detach())
    assert images.dtype == torch.float32 and images.device.type == "cuda"
