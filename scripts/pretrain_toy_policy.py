"""Pretrain the toy policy (``densegrpo.worlds.toy.policy``) with the rectified-flow loss.

Data: GenEval-format training prompts (``toy-train``) and scenes rendered for them by
``densegrpo.worlds.toy.scenes`` (a fresh random layout per sample, from a pre-rendered pool that
is partly re-rendered as training goes). Model: the toy ``UNet2DConditionModel`` and its
tiny CLIP text encoder, trained jointly from random init. Loss (method.md notation):

    x_sigma = (1 - sigma) x0 + sigma eps,   target v = eps - x0,   L = |v_theta(x_sigma, sigma, c) - v|^2

with ``sigma = shift(u)`` pushed through the same timestep shift (3.0) as the sampling grid;
``u ~ logit-normal(0, 1)`` (SD3's training density, ``--sigma-sampling logit-normal``) or
``u ~ uniform`` (``--sigma-sampling uniform``: exactly the density of the shifted sampling grid,
which trains the low-noise steps that make edges crisp 5x more often). 10% of prompts are
empty so classifier-free guidance works. An EMA of the weights is what gets saved, at several
checkpoints, because the shipped model must *not* be perfect: its toy-GenEval score should sit
in [0.3, 0.7] (pick the checkpoint with ``--score``).

The shipped weights were trained in two stages on a busy 2-core machine (see
benchmarks/bench_toy_policy.py and docs/policies.md for the record):

    python scripts/pretrain_toy_policy.py --out runs/toy_pretrain --minutes 50 --pool 32 --checkpoint-every 500
    python scripts/pretrain_toy_policy.py --out runs/toy_pretrain2 --resume runs/toy_pretrain/step_003000 \
        --sigma-sampling uniform --minutes 30 --pool 32 --checkpoint-every 500 --warmup 100

Usage (2 CPU cores, ~30 minutes):

    python scripts/pretrain_toy_policy.py --out runs/toy_pretrain --minutes 30
    python scripts/pretrain_toy_policy.py --score runs/toy_pretrain      # toy-GenEval per checkpoint
    python scripts/pretrain_toy_policy.py --ship runs/toy_pretrain/step_004000   # copy into the package
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import time
from pathlib import Path

import torch


def shift_sigma(u: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's timestep shift ``shift * u / (1 + (shift - 1) u)`` (the sampling grid's map)."""
    return shift * u / (1 + (shift - 1) * u)


class ScenePool:
    """Pre-rendered scenes per training prompt, stored as uint8, refreshed a slice at a time."""

    def __init__(self, metadata: list[dict], per_prompt: int, seed: int, size: int = 32):
        from densegrpo.worlds.toy.scenes import render_batch

        self.render_batch = render_batch
        self.metadata = metadata
        self.per_prompt = per_prompt
        self.size = size
        self.images = torch.empty(len(metadata), per_prompt, 3, size, size, dtype=torch.uint8)
        self.seed = seed
        self.next_column = 0
        for column in range(per_prompt):
            self.refresh_column()

    def refresh_column(self) -> None:
        column = self.next_column % self.per_prompt
        images = self.render_batch(self.metadata, seed=self.seed, size=self.size)
        self.seed += 1
        self.images[:, column] = (images * 255).round().to(torch.uint8)
        self.next_column += 1

    def sample(self, prompt_index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        column = torch.randint(0, self.per_prompt, (len(prompt_index),), generator=generator)
        return self.images[prompt_index, column].float() / 255


def save_checkpoint(transformer, text_encoder, folder: Path, info: dict, text_encoder_frozen: bool = False) -> None:
    """UNet (and the text encoder unless it was frozen: then the shipped one is used)."""
    folder.mkdir(parents=True, exist_ok=True)
    if text_encoder_frozen:
        copy.deepcopy(transformer).half().save_pretrained(folder / "unet", safe_serialization=True)  # fp16 on disk
    else:
        transformer.save_pretrained(folder / "unet", safe_serialization=True)
        text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    (folder / "train_info.json").write_text(json.dumps(info, indent=2, default=str))


def train(args: argparse.Namespace) -> None:
    from densegrpo.contracts.tokenizers import clip_tokenizer
    from densegrpo.worlds.toy.policy import (
        TOY_MAX_TOKENS,
        build_toy_modules,
        encode_toy_prompts,
        pixels_to_latents,
        unet_forward,
    )
    from densegrpo.worlds.toy.prompts import load_prompts

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a")
    metadata = load_prompts("toy-train")
    prompts = [m["prompt"] for m in metadata]
    start = time.time()
    pool = ScenePool(metadata, args.pool, seed=args.seed * 100003, size=args.resolution)
    print(f"rendered {len(metadata)} x {args.pool} scenes in {time.time() - start:.1f}s", flush=True)

    start_from = args.resume or args.init
    if start_from is not None:  # a checkpoint's (EMA) weights; the optimiser restarts
        transformer, text_encoder = build_toy_modules("pretrained", folder=start_from)
    else:
        transformer, text_encoder = build_toy_modules("random", seed=args.seed, resolution=args.resolution)
    transformer.register_to_config(sample_size=args.resolution)
    transformer.train()
    text_encoder.train(not args.freeze_text_encoder).requires_grad_(not args.freeze_text_encoder)
    tokenizer = clip_tokenizer(TOY_MAX_TOKENS)
    params = list(transformer.parameters()) + ([] if args.freeze_text_encoder else list(text_encoder.parameters()))
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.99))
    ema_transformer = copy.deepcopy(transformer).eval().requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    ema_params = list(ema_transformer.parameters()) + ([] if args.freeze_text_encoder else list(ema_text.parameters()))
    ema_pairs = list(zip(ema_params, params))
    generator = torch.Generator().manual_seed(args.seed)
    print(f"transformer {sum(p.numel() for p in transformer.parameters())/1e6:.2f} M params, "
          f"text encoder {sum(p.numel() for p in text_encoder.parameters())/1e6:.2f} M", flush=True)

    train_start = time.time()

    def save_ema(step: int, loss_ema: float | None) -> None:
        info = {**vars(args), "step": step, "loss_ema": loss_ema, "elapsed_minutes": (time.time() - train_start) / 60}
        save_checkpoint(ema_transformer, ema_text, out / f"step_{step:06d}", info, text_encoder_frozen=args.freeze_text_encoder)
    step = int(json.loads((args.resume / "train_info.json").read_text())["step"]) if args.resume else 0
    first_step = step
    running = None
    while True:
        elapsed = time.time() - train_start
        if step - first_step >= args.steps or elapsed > args.minutes * 60:
            break
        lr = args.lr * min(1.0, (step - first_step + 1) / args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(metadata), (args.batch,), generator=generator)
        x0 = pixels_to_latents(pool.sample(index, generator))
        batch_prompts = [
            "" if torch.rand((), generator=generator) < args.caption_dropout else prompts[i] for i in index.tolist()
        ]
        eps = torch.randn(x0.shape, generator=generator)
        if args.sigma_sampling == "logit-normal":
            u = torch.sigmoid(torch.randn(args.batch, generator=generator))  # SD3's logit-normal(0, 1)
        else:
            u = torch.rand(args.batch, generator=generator)  # shifted like the grid: same density as sampling
        sigma = shift_sigma(u, args.shift)
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps
        target = eps - x0
        cond = encode_toy_prompts(tokenizer, text_encoder, batch_prompts)
        v = unet_forward(transformer, x_sigma, sigma, cond)
        loss = torch.nn.functional.mse_loss(v.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step - first_step) / (10 + step - first_step)) if not args.resume else args.ema
        with torch.no_grad():
            for ema_p, p in ema_pairs:
                ema_p.lerp_(p.detach(), 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % args.refresh_every == 0:
            pool.refresh_column()
        if step % 50 == 0:
            record = {"step": step, "loss": loss.item(), "loss_ema": running, "lr": lr, "minutes": (time.time() - train_start) / 60}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if step % args.checkpoint_every == 0:
            save_ema(step, running)
    save_ema(step, running)
    print(f"done: {step} steps in {(time.time() - train_start) / 60:.1f} min, loss (EMA of batches) {running:.4f}", flush=True)


def score_checkpoints(root: Path, num_steps: int, per_prompt: int, threads: int) -> None:
    """toy-GenEval of every checkpoint under ``root`` on the test prompts (``densegrpo eval``'s code)."""
    from densegrpo.run.evaluate import evaluate_policy
    from densegrpo.worlds.toy.policy import ToyPolicy

    torch.set_num_threads(threads)
    for folder in sorted(p for p in root.iterdir() if (p / "unet").is_dir()):
        resolution = int(json.loads((folder / "unet" / "config.json").read_text()).get("sample_size", 32))
        policy = ToyPolicy(ToyPolicy.Config(model=str(folder), resolution=resolution, lora={"enabled": False}))
        report = evaluate_policy(policy, "toy-geneval", steps=num_steps, per_prompt=per_prompt)
        partial = {tag: round(values["partial"], 3) for tag, values in report["per_tag"].items()}
        print(json.dumps({"checkpoint": folder.name, "overall": report["overall"], "partial_per_tag": partial}), flush=True)


def ship(folder: Path) -> None:
    """Copy a checkpoint's weights into the package (densegrpo/worlds/toy/weights/toy_policy[_16])."""
    from densegrpo.worlds.toy.policy import packaged_weights

    info = json.loads((folder / "train_info.json").read_text()) if (folder / "train_info.json").exists() else {}
    target = packaged_weights(int(info.get("resolution", 32)))
    for sub in ("unet", "text_encoder"):
        if (target / sub).exists():
            shutil.rmtree(target / sub)
        if (folder / sub).exists():
            shutil.copytree(folder / sub, target / sub)
    (target / "train_info.json").write_text(json.dumps(info, indent=2))
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"shipped {folder} -> {target} ({size / 1e6:.1f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/toy_pretrain", help="output folder (log.jsonl, step_*/ checkpoints)")
    parser.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    parser.add_argument("--steps", type=int, default=1_000_000, help="max optimiser steps")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--ema", type=float, default=0.999)
    parser.add_argument("--shift", type=float, default=3.0, help="timestep shift, as the sampling grid")
    parser.add_argument("--sigma-sampling", choices=["logit-normal", "uniform"], default="logit-normal",
                        help="density of u before the shift: SD3's logit-normal or uniform (the sampling grid's density)")
    parser.add_argument("--caption-dropout", type=float, default=0.1)
    parser.add_argument("--pool", type=int, default=64, help="pre-rendered scenes per training prompt")
    parser.add_argument("--refresh-every", type=int, default=25, help="re-render one pool column every K steps")
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is faster on a busy 2-core machine)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resume", type=Path, default=None, help="continue training from this checkpoint folder")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this checkpoint's weights at step 0 (e.g. the shipped 32 px model for --resolution 16)")
    parser.add_argument("--resolution", type=int, default=32, choices=[32, 16], help="pixel size of the scenes and the latent")
    parser.add_argument("--freeze-text-encoder", action="store_true",
                        help="train the UNet only and save it alone (fp16); the shipped 32 px text encoder is used with it")
    parser.add_argument("--score", type=Path, default=None, help="score every checkpoint in this folder and exit")
    parser.add_argument("--score-steps", type=int, default=40)
    parser.add_argument("--score-per-prompt", type=int, default=4)
    parser.add_argument("--ship", type=Path, default=None, help="copy this checkpoint into the package and exit")
    args = parser.parse_args()
    if args.score is not None:
        score_checkpoints(args.score, args.score_steps, args.score_per_prompt, args.threads)
    elif args.ship is not None:
        ship(args.ship)
    else:
        train(args)


if __name__ == "__main__":
    main()
