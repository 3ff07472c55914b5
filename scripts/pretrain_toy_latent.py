"""Pretrain the latent toy (``densegrpo.worlds.toy.latent_policy``): an autoencoder, then a flow model on its latents.

Stage ``ae``: :class:`densegrpo.worlds.toy.autoencoder.ToyAutoencoder` on scenes rendered for the
``toy-train`` prompts (a fresh random layout per sample; test prompts are never seen), loss
``|decode(encode(x) + 0.05 eps) - x|^2 + 1e-3 |z|^2`` (the noise makes the decoder tolerate the
flow model's small latent errors; the penalty keeps the latent scale fixed). At the end the
latents' mean and standard deviation over 4096 scenes become ``shift_factor`` and
``scaling_factor``.

Stage ``flow``: :class:`densegrpo.worlds.toy.latent_denoiser.ToyLatentDenoiser` with the rectified-flow
loss on the scaled latents of those scenes (method.md notation)::

    x_sigma = (1 - sigma) x0 + sigma eps,   target v = eps - x0,   L = |v_theta(x_sigma, sigma, c) - v|^2

``sigma = shift(u)``, ``u ~ uniform`` (the density of the shifted sampling grid, shift 3), 10%
empty prompts so CFG works, conditioned on the pooled embedding of the shipped toy text encoder
(frozen, shared with the pixel toys). An EMA of the weights is saved at checkpoints, because the
shipped model must not be perfect: its toy-GenEval should sit in [0.3, 0.7] (``score``).

Usage (2 CPU cores)::

    python scripts/pretrain_toy_latent.py ae --out runs/toy_latent_ae --minutes 8
    python scripts/pretrain_toy_latent.py flow --ae runs/toy_latent_ae/final --out runs/toy_latent_flow --minutes 12
    python scripts/pretrain_toy_latent.py score runs/toy_latent_flow       # toy-GenEval of every checkpoint
    python scripts/pretrain_toy_latent.py ship runs/toy_latent_flow/step_006000
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import time
from pathlib import Path

import torch

# run as `python scripts/pretrain_toy_latent.py`, so the sibling script imports: one scene pool, one shift map
from pretrain_toy_policy import ScenePool, shift_sigma


def agreement(autoencoder, metadata: list[dict], seed: int, count: int = 1024) -> dict:
    """toy-GenEval of rendered scenes against the same scenes after encode-decode."""
    from densegrpo.worlds.toy.geneval_reward import ToyGenEvalReward
    from densegrpo.worlds.toy.scenes import render_batch

    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(0, len(metadata), (count,), generator=generator).tolist()
    chosen = [metadata[i] for i in index]
    images = render_batch(chosen, seed=seed)
    with torch.no_grad():
        recon = autoencoder.decode(autoencoder.encode(images))
    reward = ToyGenEvalReward()
    prompts = [m["prompt"] for m in chosen]
    original, decoded = reward(images, prompts, chosen), reward(recon, prompts, chosen)
    return {"rendered": float(original.mean()), "decoded": float(decoded.mean()),
            "same_score": float((original - decoded).abs().lt(1e-6).float().mean()),
            "mse": float(((recon - images) ** 2).mean())}


def train_autoencoder(args: argparse.Namespace) -> None:
    from densegrpo.worlds.toy.autoencoder import ToyAutoencoder
    from densegrpo.worlds.toy.prompts import load_prompts

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    metadata = load_prompts("toy-train")
    pool = ScenePool(metadata, args.pool, seed=args.seed * 100003)
    if args.init is not None:  # continue from a saved autoencoder (the optimiser restarts)
        model = ToyAutoencoder.from_pretrained(args.init).train()
    else:
        model = ToyAutoencoder(latent_channels=args.latent_channels).train()
    if args.decoder_only:  # the latents stay those a flow model may already be training on
        model.encoder.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(args.seed)
    start, step = time.time(), 0
    while time.time() - start < args.minutes * 60 and step < args.steps:
        # warm-up, then cosine decay over the wall-clock budget: the last steps sharpen edges
        progress = (time.time() - start) / (args.minutes * 60)
        lr = args.lr * min(1.0, (step + 1) / 200) * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        images = pool.sample(torch.randint(0, len(metadata), (args.batch,), generator=generator), generator)
        z = model.encode(images)
        recon = model.decode(z + args.latent_noise * torch.randn(z.shape, generator=generator), clamp=False)
        reconstruction = ((recon - images) ** 2).mean()
        loss = reconstruction + args.latent_penalty * (z**2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)  # without it a spike once undid 1000 steps
        optimizer.step()
        step += 1
        if step % args.refresh_every == 0:
            pool.refresh_column()
        if step % args.checkpoint_every == 0:
            model.save_pretrained(out / f"step_{step:06d}", safe_serialization=True)
        if step % 100 == 0:
            print(json.dumps({"step": step, "mse": round(reconstruction.item(), 5), "z_rms": round(z.pow(2).mean().sqrt().item(), 3),
                              "minutes": round((time.time() - start) / 60, 2)}), flush=True)
    model.eval()
    if not args.decoder_only:
        with torch.no_grad():
            images = pool.sample(torch.randint(0, len(metadata), (4096,), generator=generator), generator)
            z = model.encode(images)
        model.register_to_config(shift_factor=float(z.mean()), scaling_factor=float(1 / z.std()))
    report = agreement(model, metadata, seed=args.seed + 1)
    print(json.dumps({"final_step": step, **report}), flush=True)
    model.save_pretrained(out / "final", safe_serialization=True)
    (out / "final" / "train_info.json").write_text(json.dumps({**vars(args), "step": step, **report}, indent=2, default=str))


def train_flow(args: argparse.Namespace) -> None:
    from densegrpo.contracts.tokenizers import clip_tokenizer
    from densegrpo.worlds.toy.autoencoder import ToyAutoencoder
    from densegrpo.worlds.toy.latent_denoiser import ToyLatentDenoiser
    from densegrpo.worlds.toy.policy import (
        TOY_MAX_TOKENS,
        build_toy_modules,
        encode_toy_prompts,
    )
    from densegrpo.worlds.toy.prompts import load_prompts

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "log.jsonl", "a")
    metadata = load_prompts("toy-train")
    prompts = [m["prompt"] for m in metadata]
    autoencoder = ToyAutoencoder.from_pretrained(args.ae).eval().requires_grad_(False)
    _, text_encoder = build_toy_modules("pretrained")
    text_encoder.eval().requires_grad_(False)
    tokenizer = clip_tokenizer(TOY_MAX_TOKENS)
    with torch.no_grad():
        pooled = encode_toy_prompts(tokenizer, text_encoder, prompts + [""]).pooled_embeds  # (P+1, 64)
    empty = len(prompts)
    # The scenes' latents, encoded once per rendered column (encoding every batch would cost more than the step).
    pool = ScenePool(metadata, args.pool, seed=args.seed * 100003 + 7)

    def encode_column(column: int) -> torch.Tensor:
        with torch.no_grad():
            return autoencoder.scale_latents(autoencoder.encode(pool.images[:, column].float() / 255))

    latents = torch.stack([encode_column(c) for c in range(args.pool)], dim=1)  # (P, pool, C, 4, 4)

    model = ToyLatentDenoiser(latent_channels=autoencoder.config.latent_channels, hidden=args.hidden, num_blocks=args.blocks).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(args.seed)
    print(f"denoiser {sum(p.numel() for p in model.parameters()) / 1e6:.3f} M params", flush=True)
    start, step, running = time.time(), 0, None

    def save(step: int) -> None:
        folder = out / f"step_{step:06d}"
        ema.save_pretrained(folder / "denoiser", safe_serialization=True)
        autoencoder.save_pretrained(folder / "autoencoder", safe_serialization=True)
        info = {**vars(args), "step": step, "loss_ema": running, "minutes": (time.time() - start) / 60}
        (folder / "train_info.json").write_text(json.dumps(info, indent=2, default=str))

    while time.time() - start < args.minutes * 60 and step < args.steps:
        lr = args.lr * min(1.0, (step + 1) / 200)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(metadata), (args.batch,), generator=generator)
        x0 = latents[index, torch.randint(0, args.pool, (args.batch,), generator=generator)]
        drop = torch.rand(args.batch, generator=generator) < args.caption_dropout
        cond = pooled[torch.where(drop, torch.full_like(index, empty), index)]
        eps = torch.randn(x0.shape, generator=generator)
        sigma = shift_sigma(torch.rand(args.batch, generator=generator), args.shift)
        s = sigma.view(-1, 1, 1, 1)
        v = model(((1 - s) * x0 + s * eps), sigma, cond)
        loss = torch.nn.functional.mse_loss(v, eps - x0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema_p, p in zip(ema.parameters(), model.parameters()):
                ema_p.lerp_(p.detach(), 1 - decay)
        step += 1
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % args.refresh_every == 0:
            column = pool.next_column % args.pool
            pool.refresh_column()
            latents[:, column] = encode_column(column)
        if step % 200 == 0:
            record = {"step": step, "loss_ema": round(running, 4), "minutes": round((time.time() - start) / 60, 2)}
            log.write(json.dumps(record) + "\n")
            log.flush()
            print(json.dumps(record), flush=True)
        if step % args.checkpoint_every == 0:
            save(step)
    save(step)
    print(f"done: {step} steps in {(time.time() - start) / 60:.1f} min", flush=True)


def score_checkpoints(args: argparse.Namespace) -> None:
    """toy-GenEval of every checkpoint under ``root`` on the test prompts (``densegrpo eval``'s code)."""
    from densegrpo.run.evaluate import evaluate_policy
    from densegrpo.worlds.toy.latent_policy import ToyLatentPolicy

    torch.set_num_threads(args.threads)
    for folder in sorted(p for p in Path(args.root).iterdir() if (p / "denoiser").is_dir()):
        policy = ToyLatentPolicy(ToyLatentPolicy.Config(model=str(folder), lora={"enabled": False}))
        report = evaluate_policy(policy, "toy-geneval", steps=args.steps, per_prompt=args.per_prompt)
        partial = {tag: round(values["partial"], 3) for tag, values in report["per_tag"].items()}
        print(json.dumps({"checkpoint": folder.name, "overall": report["overall"], "partial_per_tag": partial}), flush=True)


def ship(args: argparse.Namespace) -> None:
    """Copy a checkpoint (denoiser/ and autoencoder/) into the package (densegrpo/worlds/toy/weights/toy_latent)."""
    from densegrpo.worlds.toy.latent_policy import packaged_latent_weights

    folder, target = Path(args.folder), packaged_latent_weights()
    for sub in ("denoiser", "autoencoder"):
        if (target / sub).exists():
            shutil.rmtree(target / sub)
        shutil.copytree(folder / sub, target / sub)
    shutil.copy(folder / "train_info.json", target / "train_info.json")
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    print(f"shipped {folder} -> {target} ({size / 1e6:.2f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="stage", required=True)
    for name in ("ae", "flow"):
        p = sub.add_parser(name)
        p.add_argument("--out", required=True)
        p.add_argument("--minutes", type=float, default=10.0)
        p.add_argument("--steps", type=int, default=1_000_000)
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--pool", type=int, default=64, help="scenes kept per training prompt")
        p.add_argument("--refresh-every", type=int, default=20, help="re-render one pool column every K steps")
    ae = sub.choices["ae"]
    ae.add_argument("--batch", type=int, default=128)
    ae.add_argument("--lr", type=float, default=2e-3)
    ae.add_argument("--latent-channels", type=int, default=4)
    ae.add_argument("--latent-noise", type=float, default=0.05)
    ae.add_argument("--latent-penalty", type=float, default=1e-3)
    ae.add_argument("--checkpoint-every", type=int, default=500)
    ae.add_argument("--decoder-only", action="store_true",
                    help="train the decoder alone (with --init): the encoder, its latents and their scale stay as they are")
    ae.add_argument("--init", default=None, help="continue from this autoencoder folder (e.g. a previous run's final/)")
    flow = sub.choices["flow"]
    flow.add_argument("--ae", required=True, help="autoencoder folder written by the ae stage")
    flow.add_argument("--batch", type=int, default=512)
    flow.add_argument("--lr", type=float, default=1e-3)
    flow.add_argument("--hidden", type=int, default=256)
    flow.add_argument("--blocks", type=int, default=4)
    flow.add_argument("--ema", type=float, default=0.999)
    flow.add_argument("--shift", type=float, default=3.0)
    flow.add_argument("--caption-dropout", type=float, default=0.1)
    flow.add_argument("--checkpoint-every", type=int, default=1000)
    score = sub.add_parser("score")
    score.add_argument("root")
    score.add_argument("--steps", type=int, default=40)
    score.add_argument("--per-prompt", type=int, default=4)
    score.add_argument("--threads", type=int, default=2)
    shipping = sub.add_parser("ship")
    shipping.add_argument("folder")
    args = parser.parse_args()
    {"ae": train_autoencoder, "flow": train_flow, "score": score_checkpoints, "ship": ship}[args.stage](args)


if __name__ == "__main__":
    main()
