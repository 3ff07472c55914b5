"""GenEval's scoring rules, shared by the toy reward and the real GenEval plugin.

Given the same detections, ``toy-geneval`` and the GenEval plugin score identically
because both call this module. A detector (the toy program detector, or Mask2Former plus
a CLIP colour classifier) turns an image into a list of :class:`Detection`; the rules
below turn ``(metadata, detections)`` into scores (method.md, section 5):

* :func:`geneval_correct`: GenEval's benchmark metric, a faithful port of ``evaluate`` and
  the detection filtering of ``evaluate_image`` in djghosh13/geneval,
  ``evaluation/evaluate_images.py`` (thresholds 0.3, 0.9 for the ``counting`` tag, at
  most 16 objects per class, no NMS, position threshold 0.1).
* :func:`strict_correct`: exact counts, exact colour counts and positions, the
  ``strict_correct`` of Flow-GRPO's GenEval reward server (yifan123/reward-server,
  ``reward_server/gen_eval.py``, ``evaluate_reward``), plus the exclude clauses.
* :func:`partial_score`: the training reward, a mean of per-clause partial credits
  (Flow-GRPO's ``score``; see its docstring for the two deliberate differences).

Metadata is GenEval's format, one dict per prompt::

    {"tag": "position", "prompt": "a photo of a circle left of a square",
     "include": [{"class": "square", "count": 1},
                 {"class": "circle", "count": 1, "position": ["left of", 0]}]}

Boxes are ``(x0, y0, x1, y1)`` with ``y`` growing downwards (image rows), in pixels of
the image the detector saw, as GenEval's mmdet boxes are. The rules are invariant to
the unit (normalised boxes give the same answers) except for GenEval's absolute
``1e-3`` dead zone in :func:`relative_position`, which only matters for objects whose
centres nearly coincide.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

THRESHOLD = 0.3
"""Confidence a detection must exceed (GenEval ``--options threshold``, default 0.3)."""

COUNTING_THRESHOLD = 0.9
"""Confidence threshold for prompts tagged ``counting`` (GenEval default 0.9)."""

MAX_OBJECTS = 16
"""At most this many detections per class are kept, most confident first (GenEval default 16)."""

NMS_THRESHOLD = 1.0
"""GenEval's ``max_overlap``: 1.0 disables its extra per-class NMS (the default)."""

POSITION_THRESHOLD = 0.1
"""Fraction of the summed box sizes ignored when judging relations (GenEval default 0.1)."""

RELATIONS = ("left of", "right of", "above", "below")
"""The position relations GenEval prompts use."""

TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
"""GenEval's six task tags."""


@dataclass(frozen=True)
class Detection:
    """One detected object.

    Attributes:
        cls: class name as in the metadata (``"circle"``, ``"dog"``, ...).
        color: colour name (GenEval's colour words), or ``None`` when unknown.
        box: ``(x0, y0, x1, y1)`` in pixels of the detector's image, ``y`` downwards.
        confidence: detection score in [0, 1] (mmdet's box score in GenEval).
    """

    cls: str
    color: str | None
    box: tuple[float, float, float, float]
    confidence: float


def compute_iou(box_a: Sequence[float], box_b: Sequence[float]) -> float:
    """GenEval's ``compute_iou`` (inclusive pixel boxes, hence the ``+ 1``)."""

    def area(box: Sequence[float]) -> float:
        return max(box[2] - box[0] + 1, 0) * max(box[3] - box[1] + 1, 0)

    inter = area(
        [max(box_a[0], box_b[0]), max(box_a[1], box_b[1]), min(box_a[2], box_b[2]), min(box_a[3], box_b[3])]
    )
    union = area(box_a) + area(box_b) - inter
    return inter / union if union else 0.0


def relative_position(
    box_a: Sequence[float], box_b: Sequence[float], position_threshold: float = POSITION_THRESHOLD
) -> set[str]:
    """Relations of box A relative to box B, as GenEval's ``relative_position`` computes them.

    The centre offset ``A - B`` is shrunk on each axis by ``position_threshold`` times the
    summed box sizes on that axis (clipped at 0); if nothing is left on either axis
    (``< 1e-3``), no relation holds. Otherwise the shrunk offset is divided by the length
    of the *original* offset and a relation holds when its component exceeds 0.5:
    ``dx < -0.5`` is "left of", ``dx > 0.5`` "right of", ``dy < -0.5`` "above",
    ``dy > 0.5`` "below" (``y`` grows downwards). Two relations can hold at once.
    """
    # Scalar transcription of GenEval's numpy code (it is called in tight sampling loops).
    ax0, ay0, ax1, ay1 = (float(v) for v in box_a[:4])
    bx0, by0, bx1, by1 = (float(v) for v in box_b[:4])
    offset_x = (ax0 + ax1) / 2 - (bx0 + bx1) / 2
    offset_y = (ay0 + ay1) / 2 - (by0 + by1) / 2

    def shrink(offset: float, dim_a: float, dim_b: float) -> float:
        sign = (offset > 0) - (offset < 0)
        return max(abs(offset) - position_threshold * (dim_a + dim_b), 0.0) * sign

    revised_x = shrink(offset_x, abs(ax1 - ax0), abs(bx1 - bx0))
    revised_y = shrink(offset_y, abs(ay1 - ay0), abs(by1 - by0))
    if abs(revised_x) < 1e-3 and abs(revised_y) < 1e-3:
        return set()
    norm = math.hypot(offset_x, offset_y)
    dx, dy = revised_x / norm, revised_y / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


def confidence_threshold(
    metadata: Mapping[str, Any], threshold: float = THRESHOLD, counting_threshold: float = COUNTING_THRESHOLD
) -> float:
    """The threshold GenEval applies to a prompt: ``counting_threshold`` for the ``counting`` tag."""
    return counting_threshold if metadata.get("tag") == "counting" else threshold


def filter_detections(
    detections: Iterable[Detection],
    threshold: float = THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
) -> dict[str, list[Detection]]:
    """Group detections by class as GenEval's ``evaluate_image`` does.

    Per class: keep detections with ``confidence > threshold`` (strictly), sort them most
    confident first, keep the first ``max_objects``, then greedily drop any that overlap an
    already kept one with IoU ``>= nms_threshold`` (never, at the default 1.0). Classes
    with nothing left are absent from the result.
    """
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        if det.confidence > threshold:
            by_class.setdefault(det.cls, []).append(det)
    kept: dict[str, list[Detection]] = {}
    for cls, dets in by_class.items():
        # Stable sort on -confidence mirrors argsort(...)[::-1] up to ties.
        ordering = sorted(dets, key=lambda d: -d.confidence)[:max_objects]
        chosen: list[Detection] = []
        while ordering:
            best = ordering.pop(0)
            chosen.append(best)
            if nms_threshold != 1:
                ordering = [d for d in ordering if compute_iou(best.box, d.box) < nms_threshold]
        kept[cls] = chosen
    return kept


def _grouped(
    metadata: Mapping[str, Any],
    detections: Iterable[Detection] | Mapping[str, list[Detection]],
    threshold: float,
    counting_threshold: float,
    max_objects: int,
    nms_threshold: float,
) -> dict[str, list[Detection]]:
    if isinstance(detections, Mapping):  # already filtered and grouped
        return {cls: list(dets) for cls, dets in detections.items()}
    return filter_detections(
        detections,
        confidence_threshold(metadata, threshold, counting_threshold),
        max_objects,
        nms_threshold,
    )


def _check_metadata(metadata: Mapping[str, Any]) -> None:
    if not isinstance(metadata, Mapping) or "include" not in metadata:
        raise ValueError(
            "GenEval metadata must be a dict with an 'include' list, e.g. "
            '{"tag": "single_object", "include": [{"class": "circle", "count": 1}]}'
        )
    for req in metadata["include"]:
        if "class" not in req or "count" not in req:
            raise ValueError(
                f"every GenEval 'include' clause needs 'class' and 'count', got {dict(req)}; "
                "fix the metadata line"
            )
        if int(req["count"]) < 1:
            raise ValueError(f"GenEval 'include' counts must be >= 1, got {dict(req)}; fix the metadata line")
        if "position" in req:
            relation, target = req["position"]
            if relation not in RELATIONS:
                raise ValueError(
                    f"unknown GenEval relation '{relation}'; use one of: {', '.join(RELATIONS)}"
                )


def _position_holds(
    found: Sequence[Detection], targets: Sequence[Detection], relation: str, position_threshold: float
) -> bool:
    return all(
        relation in relative_position(obj.box, target.box, position_threshold)
        for obj in found
        for target in targets
    )


def geneval_correct(
    metadata: Mapping[str, Any],
    detections: Iterable[Detection] | Mapping[str, list[Detection]],
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
) -> bool:
    """GenEval's "correct": the benchmark metric (``evaluate`` in ``evaluate_images.py``).

    Include clauses combine with AND, exclude clauses with OR. For an include clause
    ``{class, count}`` only the ``count`` most confident detections of the class are used:
    there must be at least ``count``; with ``color``, all of them must have that colour;
    with ``position: [relation, i]``, include clause ``i`` must have matched and every
    used object must stand in ``relation`` to every object clause ``i`` used. An exclude
    clause ``{class, count}`` fails when ``count`` or more of the class are detected.

    Args:
        metadata: one GenEval metadata dict.
        detections: raw detections (filtered here with GenEval's thresholds, 0.9 for the
            ``counting`` tag), or an already filtered ``{class: [Detection, ...]}`` map
            sorted most confident first.
    """
    _check_metadata(metadata)
    objects = _grouped(metadata, detections, threshold, counting_threshold, max_objects, nms_threshold)
    correct = True
    matched_groups: list[list[Detection] | None] = []
    for req in metadata["include"]:
        count = int(req["count"])
        found = objects.get(req["class"], [])[:count]
        matched = True
        if len(found) < count:
            matched = False
        else:
            if "color" in req and sum(d.color == req["color"] for d in found) < count:
                matched = False
            if "position" in req and matched:
                relation, target_index = req["position"]
                targets = matched_groups[int(target_index)]
                if targets is None or not _position_holds(found, targets, relation, position_threshold):
                    matched = False
        correct = correct and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []) or []:
        if len(objects.get(req["class"], [])) >= int(req["count"]):
            correct = False
    return correct


def _clause_credits(
    metadata: Mapping[str, Any],
    objects: Mapping[str, list[Detection]],
    position_threshold: float,
    clip_count: bool,
    exclude_clauses: bool,
) -> tuple[list[float], bool]:
    """Per-clause partial credits and the strict verdict, in one pass (``evaluate_reward``)."""
    credits: list[float] = []
    strict = True
    matched_groups: list[list[Detection] | None] = []
    for req in metadata["include"]:
        count = int(req["count"])
        found = objects.get(req["class"], [])
        count_credit = 1.0 - abs(count - len(found)) / count
        credits.append(max(count_credit, 0.0) if clip_count else count_credit)
        matched = len(found) == count
        if not matched:
            # Wrong count: the colour and position clauses earn nothing.
            credits.extend(0.0 for key in ("color", "position") if key in req)
        else:
            if "color" in req:
                same = sum(d.color == req["color"] for d in found)
                credits.append(1.0 - abs(count - same) / count)
                matched = same == count
            if "position" in req:
                relation, target_index = req["position"]
                targets = matched_groups[int(target_index)]
                holds = (
                    matched
                    and targets is not None
                    and _position_holds(found, targets, relation, position_threshold)
                )
                credits.append(1.0 if holds else 0.0)
                matched = holds
        strict = strict and matched
        matched_groups.append(found if matched else None)
    for req in metadata.get("exclude", []) or []:
        ok = len(objects.get(req["class"], [])) < int(req["count"])
        strict = strict and ok
        if exclude_clauses:
            credits.append(1.0 if ok else 0.0)
    return credits, strict


def strict_correct(
    metadata: Mapping[str, Any],
    detections: Iterable[Detection] | Mapping[str, list[Detection]],
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
) -> bool:
    """Strict correctness: every include clause matched *exactly* (Flow-GRPO's ``strict_correct``).

    Unlike :func:`geneval_correct`, all detections of a class count: exactly ``count`` must
    be found, exactly ``count`` of them must have the requested colour, and every one must
    stand in the requested relation to every object of the target clause. Exclude clauses
    are checked as well (the reward server skips them), so ``strict_correct`` implies
    :func:`geneval_correct`.
    """
    _check_metadata(metadata)
    objects = _grouped(metadata, detections, threshold, counting_threshold, max_objects, nms_threshold)
    return _clause_credits(metadata, objects, position_threshold, True, True)[1]


def partial_score(
    metadata: Mapping[str, Any],
    detections: Iterable[Detection] | Mapping[str, list[Detection]],
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
    clip_count: bool = True,
    exclude_clauses: bool = True,
) -> float:
    """The GenEval training reward: the mean over clauses of partial credit, in [0, 1].

    Clauses (method.md, section 5; Flow-GRPO's ``evaluate_reward``), with ``found`` all
    detections of the class:

    * count: ``1 - |count - len(found)| / count``, clipped at 0 when ``clip_count``;
    * colour (if requested): 0 if the count is wrong, else ``1 - |count - same| / count``
      with ``same`` the found objects of the requested colour;
    * position (if requested): 1 if the count (and colour) matched, the target clause
      matched and every found object stands in the relation to every target, else 0;
    * exclude (when ``exclude_clauses``): 1 if fewer than ``count`` of the class are found.

    Differences from the reward server, all deliberate: it does not clip the count credit
    (three circles for "a circle" scores -1 there); a failed position check appends both 0
    and 1 there (a bug: the ``1.0`` after its loop runs unconditionally), here a position
    clause is exactly 0 or 1; and for a clause asking for both colour and position (no
    GenEval prompt does) it adds a single 0 for a wrong count and skips the position after
    a wrong colour, while here each requested clause always counts once. On GenEval-style
    prompts, ``clip_count=False, exclude_clauses=False`` otherwise reproduces it.
    """
    _check_metadata(metadata)
    objects = _grouped(metadata, detections, threshold, counting_threshold, max_objects, nms_threshold)
    credits = _clause_credits(metadata, objects, position_threshold, clip_count, exclude_clauses)[0]
    return float(sum(credits) / len(credits)) if credits else 0.0


def clause_credits(
    metadata: Mapping[str, Any],
    detections: Iterable[Detection] | Mapping[str, list[Detection]],
    *,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_objects: int = MAX_OBJECTS,
    nms_threshold: float = NMS_THRESHOLD,
    position_threshold: float = POSITION_THRESHOLD,
    clip_count: bool = True,
) -> list[tuple[str, float]]:
    """The partial credits :func:`partial_score` averages, named by clause kind.

    Returns ``(kind, credit)`` pairs in metadata order: per include clause ``"count"``,
    then ``"color"`` and ``"position"`` when requested; then one ``"exclude"`` per exclude clause.
    """
    _check_metadata(metadata)
    objects = _grouped(metadata, detections, threshold, counting_threshold, max_objects, nms_threshold)
    credits = _clause_credits(metadata, objects, position_threshold, clip_count, True)[0]
    kinds = []
    for req in metadata["include"]:
        kinds += ["count"] + [key for key in ("color", "position") if key in req]
    kinds += ["exclude"] * len(metadata.get("exclude", []) or [])
    return list(zip(kinds, credits))


def geneval_scores(
    metadata: Mapping[str, Any],
    detections: Iterable[Detection] | Mapping[str, list[Detection]],
    **options: Any,
) -> dict[str, float | bool]:
    """All three scores at once: ``{"partial": float, "strict": bool, "correct": bool}``.

    ``options`` are the keyword arguments of :func:`partial_score` (thresholds, ``clip_count``,
    ``exclude_clauses``); evaluation commands use this to report every metric per image.
    """
    detections = detections if isinstance(detections, Mapping) else list(detections)
    shared = {k: v for k, v in options.items() if k not in ("clip_count", "exclude_clauses")}
    return {
        "partial": partial_score(metadata, detections, **options),
        "strict": strict_correct(metadata, detections, **shared),
        "correct": geneval_correct(metadata, detections, **shared),
    }


__all__ = [
    "COUNTING_THRESHOLD",
    "MAX_OBJECTS",
    "NMS_THRESHOLD",
    "POSITION_THRESHOLD",
    "RELATIONS",
    "TAGS",
    "THRESHOLD",
    "Detection",
    "clause_credits",
    "compute_iou",
    "confidence_threshold",
    "filter_detections",
    "geneval_correct",
    "geneval_scores",
    "partial_score",
    "relative_position",
    "strict_correct",
]
