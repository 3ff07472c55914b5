"""Held-out retrieval and speed of the shipped toy CLIP (``toy-clip`` reward).

    python3 benchmarks/bench_toy_clip.py [--per-prompt 8] [--seed 12345]

Renders ``--per-prompt`` fresh scenes for every prompt of ``toy-train`` and of the held-out
``toy-test`` set (never seen in training), scores each image against every prompt of its
set with PickScore's formula, and prints a markdown table:

* top1: the best-scoring caption is true for the image (GenEval-strict on the scene's
  ground truth; "a photo of a circle" is true for a red circle too);
* pairwise: the image's own caption outscores a false caption, over all (image, false caption) pairs;
* margin: mean score gap own - false;

then pairwise accuracy per tag on the test set, and the reward's speed on a batch of 352.
"""

from __future__ import annotations

import argparse
import time

import torch
from densegrpo.contracts import registry
from densegrpo.worlds.geneval_rules import TAGS, strict_correct
from densegrpo.worlds.toy.clip_model import ToyCLIP, evaluate_retrieval
from densegrpo.worlds.toy.prompts import load_prompts
from densegrpo.worlds.toy.scenes import render_scenes, sample_scenes, truth_detections


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-prompt", type=int, default=8)
    parser.add_argument("--seed", type=int, default=12345)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ToyCLIP.load()
    print(f"toy CLIP: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, "
          f"logit_scale.exp() = {model.model.logit_scale.exp().item():.1f}")
    print()
    print("| prompts | images | top1 | pairwise | margin |")
    print("|---|---|---|---|---|")
    with torch.no_grad():
        for name in ("toy-train", "toy-test"):
            metas = load_prompts(name)
            m = evaluate_retrieval(model, metas, seed=args.seed, per_prompt=args.per_prompt)
            print(f"| {name} | {len(metas) * args.per_prompt} | {m['top1']:.3f} | {m['pairwise']:.3f} | {m['margin']:.2f} |")

        # pairwise accuracy per tag on the test set: own caption vs every false test caption
        metas = load_prompts("toy-test")
        repeated = [x for x in metas for _ in range(args.per_prompt)]
        scenes = sample_scenes(repeated, seed=args.seed)
        images = render_scenes(scenes)
        scores = model.model.logit_scale.exp() * model.image_features(images) @ model.text_features(
            [x["prompt"] for x in metas]
        ).T
        own = torch.arange(len(metas)).repeat_interleave(args.per_prompt)
        truth = torch.tensor([[strict_correct(x, truth_detections(s)) for x in metas] for s in scenes])
        wins = (scores[torch.arange(len(scenes)), own][:, None] > scores) & ~truth
        print()
        print("| test tag | images | pairwise |")
        print("|---|---|---|")
        for tag in TAGS:
            rows = torch.tensor([x["tag"] == tag for x in repeated])
            acc = wins[rows].sum() / (~truth[rows]).sum()
            print(f"| {tag} | {int(rows.sum())} | {acc:.3f} |")

    reward = registry.load("rewards", "toy-clip", {})
    batch = images.repeat(2, 1, 1, 1)[:352]
    prompts = [x["prompt"] for x in repeated * 2][:352]
    reward(batch, prompts, None)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        reward(batch, prompts, None)
        times.append(time.perf_counter() - start)
    print()
    print(f"speed: {1000 * min(times) / len(batch):.3f} ms per image (best of 5, batch of 352, "
          f"{torch.get_num_threads()} torch thread(s))")


if __name__ == "__main__":
    main()
