"""The toy world's scenes: seeded, procedural, small RGB images of coloured shapes.

A :class:`Scene` is 1 to 4 non-overlapping flat-coloured shapes (:data:`SHAPES`) in
:data:`COLORS` on a white background. Geometry is resolution free (normalised to the
image side), so one scene renders at any size; the toy world uses 32x32.

:func:`scene_from_metadata` samples a scene that satisfies a GenEval-format prompt
(counts, colours, position relations, judged with the same rules the reward uses:
:func:`densegrpo.worlds.geneval_rules.relative_position`), and :func:`render_batch` turns a list
of metadata into a ``(N, 3, H, W)`` float32 batch in [0, 1], the layout every reward takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from densegrpo.worlds.geneval_rules import Detection, relative_position

SHAPES = ("circle", "square", "triangle")
"""Object classes. Triangles point up."""

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.10, 0.10),
    "orange": (1.00, 0.55, 0.00),
    "yellow": (0.95, 0.88, 0.10),
    "green": (0.10, 0.65, 0.15),
    "blue": (0.12, 0.30, 0.95),
    "purple": (0.58, 0.15, 0.78),
    "black": (0.08, 0.08, 0.08),
}
"""Colour names (a subset of GenEval's colour words) and their RGB values in [0, 1]."""

COLORS = tuple(PALETTE)
"""The colour names, in a fixed order."""

BACKGROUND = (1.0, 1.0, 1.0)
"""Plain white background."""

DEFAULT_SIZE = 32
"""Default image side in pixels."""

SIZE_RANGE = (0.25, 0.375)
"""Object size (side of its bounding square) as a fraction of the image: 8 to 12 px at 32."""

MIN_GAP = 0.05
"""Minimum gap between object boxes and to the border, as a fraction of the image (1.6 px at 32)."""

POSITION_MARGIN = 0.2
"""Scenes for position prompts satisfy the relation with this (stricter than GenEval's 0.1) threshold,
so that small detector box errors never flip a relation."""

SUPERSAMPLE = 4
"""Sub-pixel samples per axis used to anti-alias edges."""


@dataclass(frozen=True)
class SceneObject:
    """One shape. Coordinates are fractions of the image side, ``y`` downwards.

    Attributes:
        shape: one of :data:`SHAPES`.
        color: one of :data:`COLORS`.
        cx, cy: centre of the bounding square.
        size: side of the bounding square (circle diameter, square side, triangle base and height).
    """

    shape: str
    color: str
    cx: float
    cy: float
    size: float

    def box(self, image_size: int = 1) -> tuple[float, float, float, float]:
        """``(x0, y0, x1, y1)`` of the bounding square, scaled to ``image_size`` pixels."""
        half = self.size / 2
        return (
            (self.cx - half) * image_size,
            (self.cy - half) * image_size,
            (self.cx + half) * image_size,
            (self.cy + half) * image_size,
        )


@dataclass
class Scene:
    """A list of non-overlapping objects on a plain background."""

    objects: list[SceneObject] = field(default_factory=list)


def _coverage(obj: SceneObject, xs: np.ndarray, ys: np.ndarray) -> np.ndarray:
    """Boolean inside-mask of ``obj`` at normalised sample points ``xs (1,W)``, ``ys (H,1)``."""
    half = obj.size / 2
    dx, dy = xs - obj.cx, ys - obj.cy
    if obj.shape == "circle":
        return dx * dx + dy * dy <= half * half
    if obj.shape == "square":
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if obj.shape == "triangle":
        # Apex at the top centre, base along the bottom edge of the bounding square.
        depth = dy + half  # 0 at the apex, size at the base
        return (depth >= 0) & (dy <= half) & (np.abs(dx) <= depth / 2)
    raise ValueError(f"unknown shape '{obj.shape}'; use one of: {', '.join(SHAPES)}")


def render(scene: Scene, size: int = DEFAULT_SIZE) -> np.ndarray:
    """Render ``scene`` as an ``(size, size, 3)`` float32 array in [0, 1] (HWC).

    Edges are anti-aliased by :data:`SUPERSAMPLE`-fold supersampling; objects never overlap.
    """
    if size < 8:
        raise ValueError(f"render size must be at least 8 pixels, got {size}")
    image = np.empty((size, size, 3), dtype=np.float32)
    image[:] = BACKGROUND
    offsets = (np.arange(SUPERSAMPLE, dtype=np.float32) + 0.5) / SUPERSAMPLE
    for obj in scene.objects:
        if obj.color not in PALETTE:
            raise ValueError(f"unknown colour '{obj.color}'; use one of: {', '.join(COLORS)}")
        # Only the pixels under the object's bounding square can be covered.
        x0, y0, x1, y1 = (int(np.floor(v)) for v in obj.box(size))
        x0, y0 = max(x0, 0), max(y0, 0)
        x1, y1 = min(x1 + 1, size), min(y1 + 1, size)
        if x1 <= x0 or y1 <= y0:
            continue
        xs = ((np.arange(x0, x1, dtype=np.float32)[:, None] + offsets[None]).reshape(1, -1)) / size
        ys = ((np.arange(y0, y1, dtype=np.float32)[:, None] + offsets[None]).reshape(-1, 1)) / size
        inside = _coverage(obj, xs, ys).astype(np.float32)
        alpha = inside.reshape(y1 - y0, SUPERSAMPLE, x1 - x0, SUPERSAMPLE).mean(axis=(1, 3))[..., None]
        color = np.asarray(PALETTE[obj.color], dtype=np.float32)
        region = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = region * (1 - alpha) + color * alpha
    return np.clip(image, 0.0, 1.0)


def truth_detections(scene: Scene, size: int = DEFAULT_SIZE) -> list[Detection]:
    """The scene's objects as perfect detections (confidence 1, boxes in pixels at ``size``)."""
    return [Detection(obj.shape, obj.color, obj.box(size), 1.0) for obj in scene.objects]


def _boxes_apart(a: SceneObject, b: SceneObject, gap: float) -> bool:
    ax0, ay0, ax1, ay1 = a.box()
    bx0, by0, bx1, by1 = b.box()
    return ax1 + gap <= bx0 or bx1 + gap <= ax0 or ay1 + gap <= by0 or by1 + gap <= ay0


def _requested_objects(
    metadata: Mapping[str, Any], rng: np.random.Generator
) -> tuple[list[tuple[str, str, int]], list[tuple[int, str, int]]]:
    """(shape, colour, clause index) per object to draw, and (clause, relation, target clause) constraints."""
    include = metadata.get("include")
    if not include:
        raise ValueError(
            "scene metadata needs a non-empty 'include' list, e.g. "
            '{"include": [{"class": "circle", "count": 1}]}'
        )
    wanted: list[tuple[str, str, int]] = []
    relations: list[tuple[int, str, int]] = []
    for index, req in enumerate(include):
        shape = req.get("class")
        if shape not in SHAPES:
            raise ValueError(f"toy scenes cannot draw class '{shape}'; use one of: {', '.join(SHAPES)}")
        color = req.get("color")
        if color is not None and color not in PALETTE:
            raise ValueError(f"toy scenes cannot draw colour '{color}'; use one of: {', '.join(COLORS)}")
        for _ in range(int(req.get("count", 1))):
            wanted.append((shape, color if color is not None else str(rng.choice(COLORS)), index))
        if "position" in req:
            relation, target = req["position"]
            relations.append((index, str(relation), int(target)))
    if len(wanted) > 4:
        raise ValueError(f"toy scenes hold at most 4 objects, the metadata asks for {len(wanted)}")
    return wanted, relations


def scene_from_metadata(
    metadata: Mapping[str, Any],
    rng: np.random.Generator,
    *,
    size_range: tuple[float, float] = SIZE_RANGE,
    max_tries: int = 4000,
) -> Scene:
    """Sample a scene that satisfies ``metadata`` exactly (GenEval's strict sense).

    Every include clause ``{class, count, color?}`` becomes ``count`` objects of that
    shape (a random colour when none is asked for); a ``position: [relation, i]`` clause is
    placed so that each of its objects stands in ``relation`` to every object of clause
    ``i``, judged by GenEval's rule with the stricter :data:`POSITION_MARGIN`. Nothing else is
    drawn, so exclude clauses hold too. Positions and sizes are drawn from ``rng``.
    """
    wanted, relations = _requested_objects(metadata, rng)
    low, high = size_range
    for attempt in range(max_tries):
        # Crowded scenes that keep failing draw smaller objects (never below the range's minimum).
        upper = high - (high - low) * min(2 * attempt / max_tries, 1.0)
        objects: list[SceneObject] = []
        clause_of: list[int] = []
        ok = True
        for shape, color, index in wanted:
            placed = False
            for _ in range(50):
                side = float(rng.uniform(low, upper)) if upper > low else low
                lo, hi = MIN_GAP + side / 2, 1 - MIN_GAP - side / 2
                cand = SceneObject(shape, color, float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi)), side)
                if all(_boxes_apart(cand, other, MIN_GAP) for other in objects):
                    placed = True
                    break
            if not placed:
                ok = False
                break
            objects.append(cand)
            clause_of.append(index)
        if not ok:
            continue
        if all(
            relation in relative_position(a.box(), b.box(), POSITION_MARGIN)
            for clause, relation, target in relations
            for a, ca in zip(objects, clause_of)
            if ca == clause
            for b, cb in zip(objects, clause_of)
            if cb == target
        ):
            order = rng.permutation(len(objects))  # draw order carries no information
            return Scene([objects[i] for i in order])
    raise ValueError(f"could not place a scene for metadata {dict(metadata)} in {max_tries} tries")


def sample_scenes(metadatas: Sequence[Mapping[str, Any]], seed: int) -> list[Scene]:
    """One scene per metadata dict, all drawn from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    return [scene_from_metadata(m, rng) for m in metadatas]


def render_scenes(scenes: Sequence[Scene], size: int = DEFAULT_SIZE) -> torch.Tensor:
    """Render scenes as a ``(N, 3, size, size)`` float32 tensor in [0, 1]."""
    if not scenes:
        return torch.empty(0, 3, size, size)
    array = np.stack([render(scene, size) for scene in scenes])
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


def render_batch(metadatas: Sequence[Mapping[str, Any]], seed: int, size: int = DEFAULT_SIZE) -> torch.Tensor:
    """Sample and render one scene per metadata: ``(N, 3, size, size)`` float32 in [0, 1].

    The same ``seed`` and metadata give the same images.
    """
    return render_scenes(sample_scenes(metadatas, seed), size)


__all__ = [
    "BACKGROUND",
    "COLORS",
    "DEFAULT_SIZE",
    "PALETTE",
    "SHAPES",
    "Scene",
    "SceneObject",
    "render",
    "render_batch",
    "render_scenes",
    "sample_scenes",
    "scene_from_metadata",
    "truth_detections",
]
