"""Seconds per image of the ``ocr`` reward (PP-OCRv5 ONNX, CPU) on rendered signs.

Usage: python3 plugins/densegrpo-ocr/benchmarks/bench_ocr_speed.py [--size 512] [--images 20] [--backend ppocrv5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
from densegrpo_ocr.reward import OCRReward
from PIL import Image, ImageDraw, ImageFont


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", type=int, default=512, help="square image side in pixels")
    parser.add_argument("--images", type=int, default=20, help="images to score")
    parser.add_argument("--backend", default="ppocrv5", choices=["ppocrv5", "easyocr"])
    args = parser.parse_args()

    words = ["OPEN", "CLOSED", "SALE", "EXIT", "HELLO"]
    font = ImageFont.load_default(size=args.size // 6)
    batch = []
    for i in range(args.images):
        image = Image.new("RGB", (args.size, args.size), "white")
        ImageDraw.Draw(image).text((args.size // 10, args.size // 3), words[i % len(words)], fill="black", font=font)
        batch.append(torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255.0)
    images = torch.stack(batch)
    prompts = [f'a sign that says "{words[i % len(words)]}"' for i in range(args.images)]

    start = time.perf_counter()
    reward = OCRReward(OCRReward.Config(backend=args.backend))
    load_s = time.perf_counter() - start
    reward(images[:1], prompts[:1], [None])  # warm-up
    start = time.perf_counter()
    scores = reward(images, prompts, [None] * args.images)
    per_image_ms = 1000 * (time.perf_counter() - start) / args.images
    print(f"backend={args.backend} size={args.size} images={args.images} torch_threads={torch.get_num_threads()}")
    print(f"load: {load_s:.2f} s   per image: {per_image_ms:.1f} ms   mean score: {scores.nanmean():.3f}")


if __name__ == "__main__":
    main()
