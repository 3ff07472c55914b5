"""Measure the shipped toy policy: rollout speed, pretraining record, base toy-GenEval scores.

    python benchmarks/bench_toy_policy.py                 # everything (a few minutes on 2 cores)
    python benchmarks/bench_toy_policy.py --skip-scores   # speed and pretraining record only

Rollout speed: the flow-SDE sampler (noise level 0.7), 10 steps, 32 images (the issue's target is
<= 1 s on a 2-core CPU), with the default config (no CFG, LoRA r = 8 attached) and with CFG 4.5.
Base scores: 40 ODE steps on the toy-test prompts, 4 images per prompt, toy-GenEval in its
partial (training reward), strict and correct modes, through ``densegrpo.run.evaluate`` (the code
behind ``densegrpo eval --benchmark toy-geneval``). Numbers are printed as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch


def time_rollout(policy, num_images: int, steps: int, repeats: int) -> list[float]:
    from densegrpo.contracts import registry
    from densegrpo.method.sigmas import make_sigmas
    from densegrpo.worlds.toy.prompts import load_prompts

    sampler = registry.load("samplers", "flow-sde")
    prompts = [m["prompt"] for m in load_prompts("toy-train")[:num_images]]
    cond = policy.encode(prompts)
    sigmas = make_sigmas(steps, 3.0)
    noise_level = torch.full((steps,), 0.7)
    times = []
    with torch.no_grad():
        for repeat in range(repeats + 1):
            noise = torch.randn((num_images, *policy.latent_shape), generator=torch.Generator().manual_seed(repeat))
            start = time.perf_counter()
            sampler.rollout(policy, cond, noise, sigmas, noise_level, generator=torch.Generator().manual_seed(repeat))
            elapsed = time.perf_counter() - start
            if repeat:  # the first call warms up kernels
                times.append(elapsed)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--per-prompt", type=int, default=4)
    parser.add_argument("--skip-scores", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from densegrpo.worlds.toy.policy import ToyPolicy, packaged_weights

    rows = []
    for label, overrides in (("default (no CFG, LoRA r=8)", {}), ("CFG 4.5", {"guidance_scale": 4.5})):
        policy = ToyPolicy(ToyPolicy.Config(**overrides))
        times = time_rollout(policy, 32, 10, args.repeats)
        rows.append((label, statistics.median(times), min(times)))
    print(f"## Toy policy rollout: flow-SDE, 10 steps, 32 images, {args.threads} threads")
    print("| config | median s | best s | target |")
    print("|---|---:|---:|---:|")
    for label, median, best in rows:
        print(f"| {label} | {median:.3f} | {best:.3f} | <= 1 s |")

    info_path = packaged_weights() / "train_info.json"
    info = json.loads(info_path.read_text()) if info_path.exists() else {}
    size = sum(p.stat().st_size for p in packaged_weights().rglob("*") if p.is_file())
    print("\n## Pretraining record of the shipped weights (scripts/pretrain_toy_policy.py)")
    print("| optimiser steps | batch | wall-clock min | final loss (EMA of batch losses) | shipped size MB |")
    print("|---:|---:|---:|---:|---:|")
    print(f"| {info.get('step', '?')} | {info.get('batch', '?')} | {info.get('minutes', float('nan')):.1f} "
          f"| {info.get('loss_ema', float('nan')):.4f} | {size / 1e6:.1f} |")

    if args.skip_scores:
        return
    from densegrpo.run.evaluate import evaluate_policy, format_report

    policy = ToyPolicy(ToyPolicy.Config(lora={"enabled": False}))
    start = time.perf_counter()
    report = evaluate_policy(policy, "toy-geneval", steps=40, per_prompt=args.per_prompt)
    print(f"\n## Base toy-GenEval scores (40 ODE steps, toy-test, {args.per_prompt} images/prompt, {time.perf_counter() - start:.0f} s)")
    print("```")
    print(format_report(report))
    print("```")


if __name__ == "__main__":
    main()
