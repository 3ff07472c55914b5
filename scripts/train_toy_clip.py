"""Train the toy CLIP (``densegrpo.worlds.toy.clip_model``) contrastively on toy (render, prompt) pairs.

Reproduces the shipped weights in ``toolkit/densegrpo/worlds/toy/weights/toy_clip/``::

    python3 scripts/train_toy_clip.py    # 3000 steps of 128 pairs; 270 s on a busy 2-core CPU, 1 thread

The shipped weights came from exactly this command (seed 0). Its final lines report
held-out retrieval (``benchmarks/bench_toy_clip.py`` prints the same and more):
``toy-test top1 0.897  pairwise 0.996``.

Data: prompts of the ``toy-train`` split only (a tag is drawn uniformly, then a prompt of
that tag), each rendered as a fresh seeded scene; images are lightly degraded (blur, noise,
contrast) so that the reward also reads imperfect generated images. Loss: CLIP's symmetric
InfoNCE, with soft targets because a batch may hold the same prompt several times. At the
end it prints held-out retrieval on the ``toy-test`` prompts (never seen in training).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from densegrpo.worlds.toy.clip_model import ToyCLIP, evaluate_retrieval
from densegrpo.worlds.toy.prompts import load_prompts
from densegrpo.worlds.toy.scenes import render_scenes, sample_scenes

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "toolkit" / "densegrpo" / "toy" / "weights" / "toy_clip"


def tag_balanced(prompts: list[dict], count: int, rng: np.random.Generator) -> list[dict]:
    """``count`` prompts: a tag uniformly at random, then a prompt of that tag."""
    by_tag: dict[str, list[dict]] = {}
    for row in prompts:
        by_tag.setdefault(row["tag"], []).append(row)
    tags = sorted(by_tag)
    return [by_tag[tags[t]][rng.integers(len(by_tag[tags[t]]))] for t in rng.integers(len(tags), size=count)]


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur, contrast loss and Gaussian noise, per image (``(N,3,H,W)`` in [0,1])."""
    n = images.shape[0]
    blurred = F.avg_pool2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    mix = torch.rand(n, 1, 1, 1, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    images = images * (1 - mix) + blurred * mix
    contrast = 1 - 0.3 * torch.rand(n, 1, 1, 1, generator=generator)
    images = 0.5 + (images - 0.5) * contrast
    noise = 0.06 * torch.rand(n, 1, 1, 1, generator=generator) * torch.randn(images.shape, generator=generator)
    return (images + noise).clamp(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps")
    parser.add_argument("--batch", type=int, default=128, help="pairs per step")
    parser.add_argument("--pool", type=int, default=40000, help="pre-rendered training pairs")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (cosine decay)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a busy 2-core machine)"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for config.json + model.safetensors")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    start = time.time()

    train = load_prompts("toy-train")
    metas = tag_balanced(train, args.pool, rng)
    images = render_scenes(sample_scenes(metas, seed=args.seed))
    captions = [m["prompt"] for m in metas]
    caption_ids = torch.tensor([sorted(set(captions)).index(c) for c in captions])
    print(f"rendered {len(metas)} training pairs ({len(set(captions))} prompts) in {time.time() - start:.1f}s", flush=True)

    model = ToyCLIP()
    tokens = model.tokenize(captions)
    # Only ~30 of the 49408 token rows ever appear: a sparse embedding + SparseAdam keeps the
    # step cost independent of the vocabulary (a dense AdamW over 1.6M unused rows dominated).
    dense = model.model.token_embedding
    sparse = torch.nn.Embedding(dense.num_embeddings, dense.embedding_dim, sparse=True)
    sparse.weight.data.copy_(dense.weight.data)
    model.model.token_embedding = sparse
    others = [p for n, p in model.model.named_parameters() if not n.startswith("token_embedding.")]
    optimizers = [
        torch.optim.AdamW(others, lr=args.lr, weight_decay=0.05),
        torch.optim.SparseAdam([sparse.weight], lr=args.lr),
    ]
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return args.lr * (step + 1) / warmup
        return 0.5 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))

    model.train()
    for step in range(args.steps):
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step)
        index = torch.randint(len(metas), (args.batch,), generator=generator)
        batch_images = degrade(images[index], generator)
        image_features = model.model.encode_image(model.preprocess(batch_images), normalize=True)
        text_features = model.model.encode_text(tokens[index], normalize=True)
        logits = model.model.logit_scale.exp() * image_features @ text_features.T
        same = (caption_ids[index][:, None] == caption_ids[index][None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        loss = 0.5 * (
            torch.sum(-targets * F.log_softmax(logits, 1), 1).mean()
            + torch.sum(-targets * F.log_softmax(logits.T, 1), 1).mean()
        )
        for optimizer in optimizers:
            optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        with torch.no_grad():
            model.model.logit_scale.clamp_(0, math.log(100))
        if step % 50 == 0 or step == args.steps - 1:
            print(
                f"step {step:5d}  loss {loss.item():.4f}  logit_scale {model.model.logit_scale.exp().item():.1f}  "
                f"{time.time() - start:.0f}s",
                flush=True,
            )

    model.eval()
    model.save(args.out)
    print(f"saved to {args.out}; training took {time.time() - start:.0f}s", flush=True)
    with torch.no_grad():
        for name in ("toy-train", "toy-test"):
            metrics = evaluate_retrieval(model, load_prompts(name), seed=12345, per_prompt=8)
            print(name, "  ".join(f"{k} {v:.3f}" for k, v in metrics.items()), flush=True)


if __name__ == "__main__":
    main()
