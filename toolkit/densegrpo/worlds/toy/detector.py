"""A program detector for the toy world: no learning, just segmentation and shape fitting.

Pipeline, vectorised over the whole batch (about 0.1 ms per image on one CPU core):

1. Resize to :attr:`ToyDetector.work_size` (32 px) with an anti-aliased bilinear filter.
2. Background: the per-channel median of the outermost pixel ring of each image.
3. Foreground strength ``fg = max_c |pixel - background|``; pixels with ``fg > core_threshold``
   form the object cores, split into 8-connected components (``scipy.ndimage.label``).
   Pixels up to two pixels from a core are attached to it (grey dilation of the labels), so
   anti-aliased or blurred fringes count towards the right object and distant noise does not.
4. Colour: the mean colour of the strongest core pixels, named by the nearest
   :data:`~densegrpo.worlds.toy.scenes.PALETTE` entry.
5. Coverage ``alpha`` of each pixel by un-mixing it between background and object colour.
   Mass (area) and centroid of ``alpha`` fix, per hypothesised shape, the size and
   position a perfect shape would need; each hypothesis is rendered (supersampled, like
   :func:`~densegrpo.worlds.toy.scenes.render`), also in two blurred variants (generated images
   are soft), and compared to the observed ``alpha`` window. The best fit names the class
   and gives the box.
6. Confidence: the softmax weight of the best fit over the three (sharpness
   :attr:`ToyDetector.temperature`) times a fit-quality factor ``exp(-error / fit_scale)``,
   so clean shapes score close to 1, and blobs, merged objects or smudges score low
   (GenEval then drops them at its 0.3 threshold, or 0.9 for counting prompts).

Boxes are ``(x0, y0, x1, y1)`` in pixels of the *input* image, ``y`` downwards.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from densegrpo.worlds.geneval_rules import Detection
from densegrpo.worlds.toy.scenes import COLORS, PALETTE, SHAPES, SUPERSAMPLE

_PALETTE = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32)  # (K, 3)
_STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
_STRUCTURE[1] = True  # 8-connected within an image, never across the batch


@dataclass
class ToyDetector:
    """Detects toy shapes in ``(N, 3, H, W)`` float images in [0, 1] (any ``H, W >= 32``).

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
        pixels = self._resize(images)  # (N, 3, S, S) numpy
        image_of, best, color_class, boxes, confidence = (a.tolist() for a in self._fit(pixels))
        scale_x, scale_y = width / self.work_size, height / self.work_size
        out: list[list[Detection]] = [[] for _ in range(count)]
        for image, cls, color, (x0, y0, x1, y1), conf in zip(image_of, best, color_class, boxes, confidence):
            out[image].append(
                Detection(
                    cls=SHAPES[cls], color=COLORS[color], box=(x0 * scale_x, y0 * scale_y, x1 * scale_x, y1 * scale_y),
                    confidence=conf,
                )
            )
        for dets in out:
            dets.sort(key=lambda d: -d.confidence)
        return out

    def _resize(self, images: torch.Tensor) -> np.ndarray:
        """``(N, 3, H, W)`` tensor -> ``(N, 3, S, S)`` float32 numpy in [0, 1] (``S = work_size``)."""
        images = images.detach().to("cpu", torch.float32)
        if images.shape[-2:] != (self.work_size, self.work_size):
            images = F.interpolate(
                images, size=(self.work_size, self.work_size), mode="bilinear", antialias=True, align_corners=False
            )
        return np.clip(images.numpy(), 0, 1)  # numpy: a torch clamp costs several times as much here

    def _fit(self, pixels: np.ndarray):
        """``pixels (N, 3, S, S)`` -> ``(image, shape, colour, box (K, 4), confidence)`` per detected object.

        Per-pixel work runs on flat pixel indices (``image * S * S + y * S + x``) of the few pixels
        that matter (cores, then owned pixels), in the same float32 / float64 arithmetic and
        summation order as a per-pixel evaluation, so the results do not depend on how many
        pixels are skipped.
        """
        count, _, size, _ = pixels.shape
        area = size * size
        ring = np.concatenate(
            [pixels[:, :, 0], pixels[:, :, -1], pixels[:, :, 1:-1, 0], pixels[:, :, 1:-1, -1]], axis=2
        )  # (N, 3, 4S-4)
        background = np.median(ring, axis=2)  # (N, 3)
        diff = pixels - background[:, :, None, None]  # (N, 3, S, S)
        magnitude = np.abs(diff)
        fg = np.maximum(np.maximum(magnitude[:, 0], magnitude[:, 1]), magnitude[:, 2])  # (N, S, S)
        labels, num = ndimage.label(fg > self.core_threshold, structure=_STRUCTURE)
        empty = (np.zeros(0, int),) * 2 + (np.zeros(0, int), np.zeros((0, 4)), np.zeros(0))
        if num == 0:
            return empty
        index = np.arange(1, num + 1)
        # Object colour: mean of the strongest core pixels (>= 85% of the component's peak).
        core = np.flatnonzero(labels)
        core_labels, core_fg = labels.ravel()[core], fg.ravel()[core]
        peak = np.zeros(num + 1)
        order = np.argsort(core_labels, kind="stable")
        starts = np.searchsorted(core_labels[order], index)  # every label has at least one core pixel
        peak[1:] = np.maximum.reduceat(core_fg[order], starts)
        strong = core_fg >= 0.85 * peak[core_labels]
        strong_labels, strong_at = core_labels[strong], core[strong]
        weight = np.bincount(strong_labels, minlength=num + 1)[1:]
        strong_at = strong_at + (strong_at // area) * (2 * area)  # flat index into (N, 3, S, S), channel 0
        flat_pixels = pixels.ravel()
        color = np.stack(
            [np.bincount(strong_labels, flat_pixels[strong_at + c * area], minlength=num + 1)[1:] for c in range(3)],
            axis=1,
        ) / np.maximum(weight, 1)[:, None]  # (K, 3)
        color_class = np.argmin(((color[:, None, :] - _PALETTE[None]) ** 2).sum(-1), axis=1)
        image_of = np.zeros(num, dtype=int)
        image_of[core_labels - 1] = core // area

        # Attach fringe pixels (up to `reach` pixels from a core) to a neighbouring core, so
        # anti-aliased or blurred edges count and far-away background noise does not.
        owner = labels
        for _ in range(self.reach):
            owner = np.where(owner == 0, _dilate(owner), owner)
        # Coverage: project (pixel - background) onto (object colour - background), on owned pixels only.
        contrast = color - background[image_of]  # (K, 3)
        flat_owner = owner.ravel()
        owned = np.flatnonzero(flat_owner)
        owned_by = flat_owner[owned]
        own_contrast = contrast[owned_by - 1]  # (M, 3) float64
        norm = np.maximum((contrast**2).sum(-1), 1e-4)[owned_by - 1]
        at = owned + (owned // area) * (2 * area)  # flat index into (N, 3, S, S), channel 0
        flat_diff = diff.ravel()
        # float32 * float64 products summed left to right, as ``(diff * contrast).sum(-1)`` does
        projection = flat_diff[at] * own_contrast[:, 0] + flat_diff[at + area] * own_contrast[:, 1]
        projection += flat_diff[at + 2 * area] * own_contrast[:, 2]
        owned_alpha = np.clip(projection / norm, 0.0, 1.0)
        owned_alpha[owned_alpha < self.min_alpha] = 0.0
        alpha = np.zeros(flat_owner.shape)
        alpha[owned] = owned_alpha

        centres = np.arange(size) + 0.5
        mass = np.bincount(owned_by, owned_alpha, minlength=num + 1)[1:]
        keep = mass >= self.min_area
        if not keep.any():
            return empty
        owned_x = centres[owned % size]
        owned_y = centres[(owned // size) % size]
        cx = np.bincount(owned_by, owned_alpha * owned_x, minlength=num + 1)[1:] / np.maximum(mass, 1e-6)
        cy = np.bincount(owned_by, owned_alpha * owned_y, minlength=num + 1)[1:] / np.maximum(mass, 1e-6)
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
        pick = (image_of[:, None, None] * size + r) * size + c  # (K, W, W) flat pixel index
        observed = np.where(inside & (flat_owner[pick] == index[:, None, None]), alpha[pick], 0.0)

        # Hypotheses: size from the coverage mass, box centre from the centroid.
        side = np.stack([np.sqrt(4 * mass / np.pi), np.sqrt(mass), np.sqrt(2 * mass)], axis=1)  # (K, 3)
        box_cy = np.stack([cy, cy, cy - side[:, 2] / 6], axis=1)
        templates = _templates(side, box_cy, cx, left, top, self.window)  # (K, 3, W, W)
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


def _dilate(labels: np.ndarray) -> np.ndarray:
    """Grey dilation of ``(N, S, S)`` labels by a 3 x 3 square within each image.

    The same as ``ndimage.grey_dilation(labels, footprint=_STRUCTURE)``: its default ``reflect``
    border repeats the edge pixel, which a maximum ignores, so the edge padding here gives the
    same maxima; the maximum over the square is taken along rows, then along columns.
    """
    padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows = np.maximum(np.maximum(padded[:, :-2], padded[:, 1:-1]), padded[:, 2:])
    return np.maximum(np.maximum(rows[:, :, :-2], rows[:, :, 1:-1]), rows[:, :, 2:])


def _templates(side, box_cy, cx, left, top, window, prove: bool = True):
    """Supersampled coverage ``(K, 3, W, W)`` float32 of each hypothesis (circle, square, triangle).

    Rendering tests ``S x S`` (:data:`SUPERSAMPLE`) points per pixel: point
    ``(x_m, y_i) = (left + (m + 1/2) / S, top + (i + 1/2) / S)`` is covered when, with
    ``dx = x_m - cx`` and ``dy = y_i - box_cy`` rounded to float64 and ``h = side / 2``,

    * circle: ``dx * dx + dy * dy <= h ** 2``;
    * square: ``|dy| <= h`` and ``|dx| <= h``;
    * triangle: ``depth = dy + h``, ``depth >= 0`` and ``dy <= h`` and ``|dx| <= depth / 2``.

    Each test, per fine row ``i``, reads "row test and ``q(|dx|) <= threshold``" with ``q``
    non-decreasing (a circle's row test is ``dy * dy <= h ** 2``, implied by its point test), and
    the rounded ``dx`` is non-decreasing in ``m``, so the covered ``m`` of a row form an interval.
    Instead of testing all ``W*S`` points of a row, the interval ``[lo, hi]`` is solved for in real
    numbers (``|x_m - cx| <= w``, ``w`` the row's half chord) and then *proven* with the very same
    float64 test: covered at ``lo`` and ``hi`` and not at ``lo - 1`` and ``hi + 1`` (points outside
    the window count as not covered); or, for an empty row, not covered at the two neighbours
    ``hi``, ``lo = hi + 1`` with ``dx <= 0`` at ``hi`` and ``dx >= 0`` at ``lo`` (where ``|dx|`` is
    smallest). A row the proof fails for (floating-point ties) is tested at every point, as is every
    row when ``prove`` is false (the tests compare both ways). So the
    templates equal a point-by-point rendering bit for bit, without its ``(K, W*S, W*S)`` arrays.
    """
    count, shapes = len(cx), len(SHAPES)
    fine_count = window * SUPERSAMPLE
    last = fine_count - 1
    fine = (np.arange(fine_count) + 0.5) / SUPERSAMPLE
    # Shape-major layout (3, K, F): one entry per hypothesis, object and fine row.
    half = side.T[:, :, None] / 2
    dy = (top[:, None] + fine[None])[None] - box_cy.T[:, :, None]
    circle, square, triangle = (SHAPES.index(name) for name in ("circle", "square", "triangle"))
    dy2 = dy[circle] * dy[circle]
    radius2 = half[circle] ** 2
    depth = dy[triangle] + half[triangle]
    threshold = np.empty_like(dy)
    threshold[circle] = radius2
    threshold[square] = half[square]
    threshold[triangle] = depth / 2
    row_ok = np.empty(dy.shape, dtype=bool)
    row_ok[circle] = dy2 <= radius2
    row_ok[square] = np.abs(dy[square]) <= half[square]
    row_ok[triangle] = (depth >= 0) & (dy[triangle] <= half[triangle])
    if circle != 0:
        raise AssertionError("the circle rows come first in the shape-major layout")
    # Only rows that pass their row test can hold covered points; the others stay empty.
    rows = np.flatnonzero(row_ok)
    circles = int(row_ok[circle].sum())  # rows[:circles] are the circle rows
    obj = (rows // fine_count) % count
    offset = SUPERSAMPLE * left[obj] + 0.5  # x_m = (m + offset) / S exactly
    cx_r = cx[obj]
    dy2_r = dy2.ravel()[rows[:circles]]
    threshold_r = threshold.ravel()[rows]

    def test(m, sel=slice(None)):
        """The rendering test at fine columns ``m (j, R')`` (float) of the rows ``rows[sel]`` -> (covered, dx);
        never covered outside the window."""
        dx = (m + offset[sel]) / SUPERSAMPLE - cx_r[sel]
        q = np.abs(dx)
        if isinstance(sel, slice):
            n, circle_dy2 = circles, dy2_r
        else:  # sorted row numbers: the circle rows come first
            n = int((sel < circles).sum())
            circle_dy2 = dy2_r[sel[:n]]
        q[:, :n] = dx[:, :n] * dx[:, :n] + circle_dy2
        return (q <= threshold_r[sel]) & (m >= 0) & (m <= last), dx

    # Real-number solution: |x_m - cx| <= w, w the half chord of the row.
    chord = threshold_r.copy()
    chord[:circles] = np.sqrt(np.maximum(threshold_r[:circles] - dy2_r, 0.0))
    centre = (cx_r - left[obj]) * SUPERSAMPLE - 0.5  # fine column at x = cx
    lo = np.clip(np.ceil(centre - chord * SUPERSAMPLE), 0, last)
    hi = np.clip(np.floor(centre + chord * SUPERSAMPLE), 0, last)
    covered, dx = test(np.stack([lo - 1, lo, hi, hi + 1]))
    proven = np.where(
        lo <= hi,
        covered[1] & covered[2] & ~covered[0] & ~covered[3],
        (lo == hi + 1) & ~covered[1] & ~covered[2] & (dx[2] <= 0) & (dx[1] >= 0),
    ) & prove
    start, stop = lo.astype(np.int64), np.maximum(hi, lo - 1).astype(np.int64)  # an empty row: stop = start - 1
    if not proven.all():  # floating-point ties: test every point of those rows
        redo = np.flatnonzero(~proven)
        hits, _ = test(np.broadcast_to(np.arange(fine_count, dtype=float)[:, None], (fine_count, len(redo))), redo)
        found = hits.any(0)
        start[redo] = np.where(found, hits.argmax(0), 0)
        stop[redo] = np.where(found, last - hits[::-1].argmax(0), -1)
    # Per row, the points of [start, stop] in each pixel column (S fine columns), from a table.
    table = _column_counts(window)
    per_row = np.zeros((shapes * count * fine_count, window), dtype=np.uint8)
    per_row[rows] = table[start * (fine_count + 1) + stop + 1]
    # Sum the S fine rows of each pixel row (at most S * S = 16 points, so uint8 holds the count).
    counts = per_row.reshape(shapes, count, window, SUPERSAMPLE, window).sum(axis=3, dtype=np.uint8)
    return counts.transpose(1, 0, 2, 3).astype(np.float32) / SUPERSAMPLE**2


@functools.lru_cache(maxsize=4)
def _column_counts(window: int) -> np.ndarray:
    """``table[start * (F + 1) + stop + 1, j]``: fine columns of ``[start, stop]`` in pixel column ``j``
    (``F = window * SUPERSAMPLE``, ``0 <= start <= stop + 1 <= F``), uint8."""
    fine_count = window * SUPERSAMPLE
    start = np.arange(fine_count + 1)[:, None, None]
    end = np.arange(fine_count + 1)[None, :, None]  # stop + 1
    column = SUPERSAMPLE * np.arange(window)[None, None, :]
    inside = np.clip(end - column, 0, SUPERSAMPLE) - np.clip(start - column, 0, SUPERSAMPLE)
    table = np.clip(inside, 0, None).astype(np.uint8)
    table.flags.writeable = False
    return table.reshape(-1, window)


__all__ = ["ToyDetector"]
