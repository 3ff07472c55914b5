"""Accuracy and speed of the toy program detector (``densegrpo.worlds.toy.detector``).

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

    python3 benchmarks/bench_toy_detector.py --compare-reference [--scenes 2000] [--threads 2]

instead compares the detector with :class:`ReferenceToyDetector`, a frozen copy of the detector
before its interval templates and flat-index pixel stage, on the rows above plus the latent toy's
images (decoded random latents, ODE samples and their per-step clean estimates): per image set,
the share of images whose toy-geneval partial score is identical, the largest score, box and
confidence differences, and the speed ratio new / reference on batches of 256 (alternating
calls in one process, so a busy machine slows both alike).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from densegrpo.worlds.geneval_rules import (
    Detection,
    clause_credits,
    geneval_correct,
    partial_score,
    strict_correct,
)
from densegrpo.worlds.toy.detector import _PALETTE, _STRUCTURE, ToyDetector
from densegrpo.worlds.toy.prompts import load_prompts
from densegrpo.worlds.toy.scenes import (
    COLORS,
    SHAPES,
    SUPERSAMPLE,
    render_scenes,
    sample_scenes,
)
from scipy import ndimage


@dataclass
class ReferenceToyDetector:
    """FROZEN copy of ``ToyDetector`` before the interval templates (commit 4773f6b), for ``--compare-reference``
    and tests/test_toy_detector_speed_parity.py. Do not edit: it is the yardstick the fast detector must match.

    Detects toy shapes in ``(N, 3, H, W)`` float images in [0, 1] (any ``H, W >= 32``).

    Attributes:
        work_size: side the images are resized to before detection (the toy world renders at 32).
        core_threshold: foreground strength (max channel distance to the background) that
            makes a pixel part of an object core; palette colours sit at 0.85 to 1.
        min_area: objects with less coverage mass than this (pixels at ``work_size``) are noise.
        window: side of the square window (pixels) in which shapes are fitted.
        reach: fringe pixels up to this many pixels (chessboard distance) from a core belong
            to that object.
        min_alpha: coverage below this is treated as background noise.
        temperature: sharpness of the softmax over fit errors.
        fit_scale: fit error at which the quality factor has dropped to ``1/e``.
    """

    work_size: int = 32
    core_threshold: float = 0.4
    min_area: float = 12.0
    window: int = 16
    reach: int = 2
    min_alpha: float = 0.08
    temperature: float = 0.005
    fit_scale: float = 0.08

    def __call__(self, images: torch.Tensor) -> list[list[Detection]]:
        return self.detect(images)

    def detect(self, images: torch.Tensor) -> list[list[Detection]]:
        """``images (N,3,H,W)`` float32 in [0,1] -> per image, detections sorted by confidence."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images must be a (N,3,H,W) float tensor in [0,1], got {getattr(images, 'shape', type(images))}"
            )
        count, _, height, width = images.shape
        if min(height, width) < 32:
            raise ValueError(f"toy detection needs images of at least 32x32 pixels, got {height}x{width}")
        if count == 0:
            return []
        pixels = self._resize(images)  # (N, S, S, 3) numpy
        fits = self._fit(pixels)
        scale_x, scale_y = width / self.work_size, height / self.work_size
        out: list[list[Detection]] = [[] for _ in range(count)]
        for image, cls, color, box, conf in zip(*fits):
            x0, y0, x1, y1 = box
            out[image].append(
                Detection(
                    cls=SHAPES[cls],
                    color=COLORS[color],
                    box=(float(x0 * scale_x), float(y0 * scale_y), float(x1 * scale_x), float(y1 * scale_y)),
                    confidence=float(conf),
                )
            )
        for dets in out:
            dets.sort(key=lambda d: -d.confidence)
        return out

    def _resize(self, images: torch.Tensor) -> np.ndarray:
        images = images.detach().to("cpu", torch.float32)
        if images.shape[-2:] != (self.work_size, self.work_size):
            images = F.interpolate(
                images, size=(self.work_size, self.work_size), mode="bilinear", antialias=True, align_corners=False
            )
        return images.clamp(0, 1).permute(0, 2, 3, 1).contiguous().numpy()

    def _fit(self, pixels: np.ndarray):
        size = pixels.shape[1]
        ring = np.concatenate(
            [pixels[:, 0], pixels[:, -1], pixels[:, 1:-1, 0], pixels[:, 1:-1, -1]], axis=1
        )  # (N, 4S-4, 3)
        background = np.median(ring, axis=1)  # (N, 3)
        diff = pixels - background[:, None, None, :]
        fg = np.abs(diff).max(-1)  # (N, S, S)
        labels, num = ndimage.label(fg > self.core_threshold, structure=_STRUCTURE)
        empty = (np.zeros(0, int),) * 2 + (np.zeros(0, int), np.zeros((0, 4)), np.zeros(0))
        if num == 0:
            return empty
        index = np.arange(1, num + 1)
        # Object colour: mean of the strongest core pixels (>= 85% of the component's peak).
        in_core = labels > 0
        core_labels, core_fg = labels[in_core], fg[in_core]
        peak = np.zeros(num + 1)
        np.maximum.at(peak, core_labels, core_fg)
        strong = core_fg >= 0.85 * peak[core_labels]
        weight = np.bincount(core_labels[strong], minlength=num + 1)[1:]
        core_pixels = pixels[in_core][strong]
        color = np.stack(
            [np.bincount(core_labels[strong], core_pixels[:, c], minlength=num + 1)[1:] for c in range(3)], axis=1
        ) / np.maximum(weight, 1)[:, None]  # (K, 3)
        color_class = np.argmin(((color[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)
        image_of = np.zeros(num, dtype=int)
        image_of[core_labels - 1] = np.nonzero(in_core)[0]

        # Attach fringe pixels (up to `reach` pixels from a core) to a neighbouring core, so
        # anti-aliased or blurred edges count and far-away background noise does not.
        owner = labels
        for _ in range(self.reach):
            grown = ndimage.grey_dilation(owner, footprint=_STRUCTURE)
            owner = np.where(owner == 0, grown, owner)
        # Coverage: project (pixel - background) onto (object colour - background).
        contrast = color - background[image_of]  # (K, 3)
        own_contrast = np.concatenate([np.zeros((1, 3)), contrast])[owner]  # (N, S, S, 3)
        alpha = (diff * own_contrast).sum(-1) / np.maximum((own_contrast**2).sum(-1), 1e-4)
        alpha = np.where(owner > 0, np.clip(alpha, 0.0, 1.0), 0.0)
        alpha[alpha < self.min_alpha] = 0.0

        ys, xs = np.meshgrid(np.arange(size) + 0.5, np.arange(size) + 0.5, indexing="ij")
        flat_owner = owner.ravel()
        mass = np.bincount(flat_owner, alpha.ravel(), minlength=num + 1)[1:]
        keep = mass >= self.min_area
        if not keep.any():
            return empty
        cx = np.bincount(flat_owner, (alpha * xs).ravel(), minlength=num + 1)[1:] / np.maximum(mass, 1e-6)
        cy = np.bincount(flat_owner, (alpha * ys).ravel(), minlength=num + 1)[1:] / np.maximum(mass, 1e-6)
        index, mass, cx, cy = index[keep], mass[keep], cx[keep], cy[keep]
        image_of, color_class = image_of[keep], color_class[keep]

        # Observed alpha in a window around each centroid, zero where another object owns the pixel.
        half = self.window // 2
        left = np.floor(cx).astype(int) - half
        top = np.floor(cy).astype(int) - half
        offsets = np.arange(self.window)
        rows = top[:, None] + offsets[None]  # (K, W)
        cols = left[:, None] + offsets[None]
        inside = ((rows >= 0) & (rows < size))[:, :, None] & ((cols >= 0) & (cols < size))[:, None, :]
        r = np.clip(rows, 0, size - 1)[:, :, None]
        c = np.clip(cols, 0, size - 1)[:, None, :]
        observed = alpha[image_of[:, None, None], r, c]
        observed = np.where(inside & (owner[image_of[:, None, None], r, c] == index[:, None, None]), observed, 0.0)

        # Hypotheses: size from the coverage mass, box centre from the centroid.
        side = np.stack([np.sqrt(4 * mass / np.pi), np.sqrt(mass), np.sqrt(2 * mass)], axis=1)  # (K, 3)
        box_cy = np.stack([cy, cy, cy - side[:, 2] / 6], axis=1)
        templates = reference_templates(side, box_cy, cx, left, top, self.window)  # (K, 3, W, W)
        # Generated images are soft: also try each template blurred (3x3 box, half and full).
        blurred = ndimage.uniform_filter(templates, size=(1, 1, 3, 3), mode="constant")
        errors = np.full((len(mass), len(SHAPES)), np.inf)
        for mix in (0.0, 0.5, 1.0):
            candidate = (1 - mix) * templates + mix * blurred
            err = ((observed[:, None] - candidate) ** 2).sum(axis=(2, 3)) / mass[:, None]
            errors = np.minimum(errors, err)  # (K, 3) squared error per unit area
        best = errors.argmin(1)
        logits = -(errors - errors.min(1, keepdims=True)) / self.temperature
        weight = np.exp(logits)
        probability = weight[np.arange(len(best)), best] / weight.sum(1)
        quality = np.exp(-errors[np.arange(len(best)), best] / self.fit_scale)
        confidence = probability * quality

        s_best = side[np.arange(len(best)), best]
        cy_best = box_cy[np.arange(len(best)), best]
        boxes = np.stack([cx - s_best / 2, cy_best - s_best / 2, cx + s_best / 2, cy_best + s_best / 2], axis=1)
        return image_of, best, color_class, boxes, confidence


def reference_templates(side, box_cy, cx, left, top, window):
    """Supersampled coverage ``(K, 3, W, W)`` of each hypothesis with every supersampling point
    tested, as the detector did before its interval templates (the frozen reference's way)."""
    fine = (np.arange(window * SUPERSAMPLE) + 0.5) / SUPERSAMPLE
    gx, gy = left[:, None] + fine[None], top[:, None] + fine[None]  # (K, F) pixel coordinates
    out = []
    for h, shape in enumerate(SHAPES):
        s = side[:, h][:, None, None]
        dx = gx[:, None, :] - cx[:, None, None]
        dy = gy[:, :, None] - box_cy[:, h][:, None, None]
        if shape == "circle":
            cover = dx * dx + dy * dy <= (s / 2) ** 2
        elif shape == "square":
            cover = (np.abs(dx) <= s / 2) & (np.abs(dy) <= s / 2)
        else:
            depth = dy + s / 2
            cover = (depth >= 0) & (dy <= s / 2) & (np.abs(dx) <= depth / 2)
        k = len(cx)
        out.append(cover.reshape(k, window, SUPERSAMPLE, window, SUPERSAMPLE).sum(axis=(2, 4), dtype=np.float32) / SUPERSAMPLE**2)
    return np.stack(out, axis=1)


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


def latent_toy_images(count: int, seed: int, steps: int = 10):
    """Images of the latent toy policy (shipped weights) with GenEval metadata for each, by name:
    decoded random latents, ODE samples, and the ODE's per-step clean estimates (what the dense
    engine scores)."""
    from densegrpo.contracts import registry
    from densegrpo.method.sigmas import make_sigmas
    from densegrpo.worlds.toy.latent_policy import ToyLatentPolicy

    rng = np.random.default_rng(seed + 1)
    metadatas = tag_balanced(load_prompts("toy-train") + load_prompts("toy-test"), count, rng)
    policy = ToyLatentPolicy()
    generator = torch.Generator().manual_seed(seed)
    random = policy.decode(torch.randn((count, *policy.latent_shape), generator=generator))
    sampler, sigmas = registry.load("samplers", "ode"), make_sigmas(steps, 3.0)
    finals, estimates = [], []
    with torch.no_grad():
        for start in range(0, count, 256):
            chunk = metadatas[start : start + 256]
            noise = torch.randn((len(chunk), *policy.latent_shape), generator=generator)
            traj = sampler.rollout(policy, policy.encode([m["prompt"] for m in chunk]), noise, sigmas, torch.zeros(steps))
            finals.append(policy.decode(traj.final))
            for k in range(steps):
                estimates.append((policy.decode(traj.latents[:, k] - sigmas[k] * traj.velocities[:, k]), chunk))
    return [
        ("latent toy: decoded randn latents", random, metadatas),
        ("latent toy: ODE samples (10 steps)", torch.cat(finals), metadatas),
        ("latent toy: per-step clean estimates", torch.cat([e for e, _ in estimates]), [m for _, ms in estimates for m in ms]),
    ]


def compare_reference(rows, threads: int, batch: int = 256, repeats: int = 5) -> None:
    """Prints, per image set, the agreement of ToyDetector with ReferenceToyDetector and the speed ratio."""
    fast, reference = ToyDetector(), ReferenceToyDetector()
    print(f"ToyDetector vs ReferenceToyDetector (frozen copy); speed: best of {repeats} alternating calls on "
          f"batches of {batch}, {threads} torch thread(s)")
    print()
    print("| images | n | detections | identical detections | identical partial score | max abs score diff "
          "| max box diff (px) | max conf diff | ms / batch new | ms / batch ref | new / ref |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, images, metas in rows:
        new_dets, ref_dets = fast.detect(images), reference.detect(images)
        new_scores = np.array([partial_score(m, d) for m, d in zip(metas, new_dets)])
        ref_scores = np.array([partial_score(m, d) for m, d in zip(metas, ref_dets)])
        same_scores = float(np.mean(new_scores == ref_scores))
        same_dets = float(np.mean([a == b for a, b in zip(new_dets, ref_dets)]))
        box_diff = conf_diff = 0.0
        for a, b in zip(new_dets, ref_dets):
            if len(a) != len(b) or any((x.cls, x.color) != (y.cls, y.color) for x, y in zip(a, b)):
                box_diff = conf_diff = float("inf")
                continue
            for x, y in zip(a, b):
                box_diff = max(box_diff, float(np.abs(np.subtract(x.box, y.box)).max()))
                conf_diff = max(conf_diff, abs(x.confidence - y.confidence))
        part = images[:batch]
        times = {"new": [], "ref": []}
        for _ in range(repeats):
            for key, detector in (("new", fast), ("ref", reference)):
                start = time.perf_counter()
                detector.detect(part)
                times[key].append(time.perf_counter() - start)
        t_new, t_ref = min(times["new"]), min(times["ref"])
        print(f"| {name} | {len(images)} | {sum(map(len, new_dets))} | {100 * same_dets:.2f}% | {100 * same_scores:.2f}% "
              f"| {np.abs(new_scores - ref_scores).max():.2e} | {box_diff:.2e} | {conf_diff:.2e} "
              f"| {1000 * t_new:.1f} | {1000 * t_ref:.1f} | {t_new / t_ref:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compare-reference", action="store_true",
                        help="compare with the frozen ReferenceToyDetector (agreement and speed) instead")
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

    if args.compare_reference:
        rows = [("clean 32px", clean, metadatas), ("blur (half 3x3 box)", blurred, metadatas),
                ("blur (full 3x3 box)", box_blur, metadatas), ("noise 0.05", noisy, metadatas),
                ("clean 128px (bilinear x4)", upscaled, metadatas[:500])]
        compare_reference(rows + latent_toy_images(min(args.scenes, 1024), args.seed), args.threads)
        return
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
