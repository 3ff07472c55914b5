"""Accuracy and speed of the toy program detector (``densegrpo.toy.detector``).

    python3 benchmarks/bench_toy_detector.py [--scenes 2000] [--seed 0]

Renders seeded scenes for GenEval-format toy prompts (a tag uniformly, then a prompt of the
train or test set), detects objects, and prints a markdown table:

* per clause: the fraction of metadata clauses (count, colour, position, exclude) that the
  detections judge satisfied. Every scene satisfies its metadata by construction, so each
  should be 1; the issue requires >= 98% on clean renders;
* per prompt: GenEval ``correct``, ``strict`` and the mean partial score;
* per object: shape and colour accuracy of detections matched to true objects (IoU > 0.5),
  and the mean box IoU;
* speed: milliseconds per image for a batch of 352 images (the dense engine's call size).

Rows "blur" and "noise" repeat it on degraded renders (a 3x3 box blur mixed in at 50% or
applied fully; Gaussian noise with std 0.05) as a proxy for imperfect generated images, and
the last row on renders upscaled 4x (the detector resizes back to 32 px).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from densegrpo.geneval_rules import clause_credits, geneval_correct, partial_score, strict_correct
from densegrpo.toy.detector import ToyDetector
from densegrpo.toy.prompts import load_prompts
from densegrpo.toy.scenes import render_scenes, sample_scenes


def tag_balanced(prompts, count, rng):
    by_tag = {}
    for row in prompts:
        by_tag.setdefault(row["tag"], []).append(row)
    tags = sorted(by_tag)
    return [by_tag[tags[t]][rng.integers(len(by_tag[tags[t]]))] for t in rng.integers(len(tags), size=count)]


def evaluate(images, metadatas, scenes, detector):
    detections = detector.detect(images)
    size = images.shape[-1]
    clause_hits: dict[str, list[float]] = {}
    correct, strict, partial = [], [], []
    shape_ok, color_ok, ious, missed, spurious = [], [], [], 0, 0
    for metadata, scene, dets in zip(metadatas, scenes, detections):
        for name, credit in clause_credits(metadata, dets):
            clause_hits.setdefault(name, []).append(credit == 1.0)
        correct.append(geneval_correct(metadata, dets))
        strict.append(strict_correct(metadata, dets))
        partial.append(partial_score(metadata, dets))
        kept = [d for d in dets if d.confidence > 0.3]
        used = set()
        for obj in scene.objects:
            box = obj.box(size)
            best = max(range(len(kept)), key=lambda i: compute_iou_cont(box, kept[i].box), default=None)
            if best is None or compute_iou_cont(box, kept[best].box) < 0.5:
                missed += 1
                continue
            used.add(best)
            shape_ok.append(kept[best].cls == obj.shape)
            color_ok.append(kept[best].color == obj.color)
            ious.append(compute_iou_cont(box, kept[best].box))
        spurious += len(kept) - len(used)
    objects = sum(len(s.objects) for s in scenes)
    return {
        "clauses": {k: float(np.mean(v)) for k, v in sorted(clause_hits.items())},
        "clause_counts": {k: len(v) for k, v in sorted(clause_hits.items())},
        "correct": float(np.mean(correct)),
        "strict": float(np.mean(strict)),
        "partial": float(np.mean(partial)),
        "shape": float(np.mean(shape_ok)),
        "color": float(np.mean(color_ok)),
        "iou": float(np.mean(ious)),
        "missed": missed / objects,
        "spurious": spurious / objects,
    }


def compute_iou_cont(a, b):
    """IoU of continuous boxes (GenEval's compute_iou adds 1 for inclusive pixel boxes)."""
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(args.seed)
    metadatas = tag_balanced(load_prompts("toy-train") + load_prompts("toy-test"), args.scenes, rng)
    scenes = sample_scenes(metadatas, seed=args.seed)
    clean = render_scenes(scenes)
    generator = torch.Generator().manual_seed(args.seed)
    box_blur = F.avg_pool2d(F.pad(clean, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    blurred = 0.5 * clean + 0.5 * box_blur
    noisy = (clean + 0.05 * torch.randn(clean.shape, generator=generator)).clamp(0, 1)
    upscaled = F.interpolate(clean[:500], scale_factor=4, mode="bilinear", align_corners=False)
    detector = ToyDetector()

    rows = [("clean 32px", clean, metadatas, scenes), ("blur (half 3x3 box)", blurred, metadatas, scenes),
            ("blur (full 3x3 box)", box_blur, metadatas, scenes),
            ("noise 0.05", noisy, metadatas, scenes), ("clean 128px (bilinear x4)", upscaled, metadatas[:500], scenes[:500])]
    results = [(name, evaluate(images, metas, scs, detector)) for name, images, metas, scs in rows]
    clause_keys = list(results[0][1]["clauses"])
    print(f"toy detector on {args.scenes} seeded scenes (seed {args.seed}); clause counts: "
          + ", ".join(f"{k} {results[0][1]['clause_counts'][k]}" for k in clause_keys))
    print()
    header = ["images"] + [f"clause {k}" for k in clause_keys] + ["correct", "strict", "partial", "shape acc", "colour acc", "box IoU", "missed", "spurious"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, r in results:
        cells = [name] + [f"{100 * r['clauses'][k]:.2f}%" for k in clause_keys]
        cells += [f"{100 * r[k]:.2f}%" for k in ("correct", "strict")] + [f"{r['partial']:.4f}"]
        cells += [f"{100 * r[k]:.2f}%" for k in ("shape", "color")] + [f"{r['iou']:.3f}"]
        cells += [f"{100 * r[k]:.2f}%" for k in ("missed", "spurious")]
        print("| " + " | ".join(cells) + " |")

    batch = clean[:352]
    detector.detect(batch)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        detector.detect(batch)
        times.append(time.perf_counter() - start)
    print()
    print(f"speed: {1000 * min(times) / len(batch):.3f} ms per image (best of 5, batch of 352, "
          f"{torch.get_num_threads()} torch thread(s))")


if __name__ == "__main__":
    main()
