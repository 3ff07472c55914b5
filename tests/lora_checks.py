"""The LoRA check every diffusers policy's test file makes on its tiny random components."""

from __future__ import annotations

import torch


def assert_only_lora_trains(policy, x: torch.Tensor, sigma: torch.Tensor, cond) -> None:
    """Three SGD steps on ``policy`` move its LoRA weights only; LoRA-B weights pushed off zero
    change the velocity, while ``policy.reference()`` still gives the base model's.

    ``x``: a latent batch ``(N, *policy.latent_shape)``; ``sigma (N,)``; ``cond``: ``policy.encode``
    of ``N`` prompts.
    """
    with torch.no_grad():
        v_base = policy.velocity(x, sigma, cond)
    frozen = {n: p.detach().clone() for n, p in policy.transformer.named_parameters() if "lora_" not in n}
    optimizer = torch.optim.SGD(policy.trainable_parameters(), lr=1.0)
    for _ in range(3):
        optimizer.zero_grad()
        policy.velocity(x, sigma, cond).pow(2).mean().backward()
        optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in policy.transformer.named_parameters() if "lora_" not in n)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, param in policy.transformer.named_parameters():
            if "lora_B" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 0.3)
        v_lora = policy.velocity(x, sigma, cond)
        with policy.reference():
            v_ref = policy.velocity(x, sigma, cond)
    assert (v_lora - v_base).abs().max().item() > 1e-4
    assert torch.allclose(v_ref, v_base, atol=1e-6)
