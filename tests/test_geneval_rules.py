"""GenEval scoring rules on hand-built detections.

Expected values are worked out by hand from GenEval's ``evaluate_images.py`` (djghosh13/geneval)
and Flow-GRPO's reward server (yifan123/reward-server, ``gen_eval.py``), not from the code.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from densegrpo.worlds.geneval_rules import (
    Detection,
    clause_credits,
    compute_iou,
    filter_detections,
    geneval_correct,
    geneval_scores,
    partial_score,
    relative_position,
    strict_correct,
)
from densegrpo.worlds.toy.prompts import (
    color_attr,
    colors,
    counting,
    enumerate_prompts,
    position,
    single_object,
    two_object,
)


def det(cls, box=(0, 0, 10, 10), color=None, conf=0.95):
    return Detection(cls=cls, color=color, box=tuple(float(v) for v in box), confidence=conf)


def at(x, y, size=10):
    """Box of a ``size`` square whose top-left corner is (x, y)."""
    return (x, y, x + size, y + size)


def scores(metadata, detections, **kw):
    result = (
        partial_score(metadata, detections, **kw),
        strict_correct(metadata, detections),
        geneval_correct(metadata, detections),
    )
    together = geneval_scores(metadata, iter(detections), **kw)  # one pass, even over an iterator
    assert (together["partial"], together["strict"], together["correct"]) == result
    return result


# ---------------------------------------------------------------- relative_position


@pytest.mark.parametrize(
    "box_a, box_b, expected",
    [
        # offset (-20, 0); shrunk by 0.1*(10+10)=2 -> (-18, 0); /20 -> dx=-0.9
        (at(0, 0), at(20, 0), {"left of"}),
        (at(20, 0), at(0, 0), {"right of"}),
        # y grows downwards: smaller y is "above"
        (at(0, 0), at(0, 20), {"above"}),
        (at(0, 20), at(0, 0), {"below"}),
        # diagonal: (-18, -18) / 28.28 = -0.64 on both axes -> two relations
        (at(0, 0), at(20, 20), {"left of", "above"}),
        # (-20, -8) -> (-18, -6) / 21.54 = (-0.84, -0.28): only "left of"
        (at(0, 8), at(20, 16), {"left of"}),
        # (-10, -15) -> (-8, -13) / 18.03 = (-0.44, -0.72): only "above"
        (at(0, 0), at(10, 15), {"above"}),
        # centres 1 px apart, inside the 2 px dead zone on both axes: no relation
        (at(0, 0), at(1, 1), set()),
        # overlapping boxes far apart vertically still relate
        (at(0, 0, 30), at(5, 40, 10), {"above"}),
    ],
)
def test_relative_position_hand_cases(box_a, box_b, expected):
    assert relative_position(box_a, box_b) == expected


def test_relative_position_threshold_scales_with_box_size():
    # offset (-12, 0) between two 20 px boxes: shrunk by 0.1*40 = 4 -> (-8, 0) / 12 = -0.67: left.
    assert relative_position(at(0, 0, 20), at(12, 0, 20)) == {"left of"}
    # with position_threshold 0.3 the shrink is 12 -> nothing left: no relation
    assert relative_position(at(0, 0, 20), at(12, 0, 20), position_threshold=0.3) == set()


def test_compute_iou_inclusive_pixels():
    # GenEval adds 1 to widths: (0..9) x (0..9) is 100 px; overlap (5..9) x (0..9) is 50 px
    assert compute_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert compute_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0


# ---------------------------------------------------------------- filtering


def test_filter_threshold_is_strict_sorted_and_capped():
    dets = [det("circle", conf=c) for c in (0.3, 0.31, 0.9, 0.5)] + [det("square", conf=0.2)]
    grouped = filter_detections(dets, threshold=0.3)
    assert list(grouped) == ["circle"]  # squares all below threshold: class absent
    assert [d.confidence for d in grouped["circle"]] == [0.9, 0.5, 0.31]
    many = [det("circle", conf=0.5 + i / 100) for i in range(20)]
    assert len(filter_detections(many)["circle"]) == 16


def test_filter_optional_nms():
    a, b = det("circle", at(0, 0), conf=0.9), det("circle", at(1, 0), conf=0.8)
    assert len(filter_detections([a, b])["circle"]) == 2  # GenEval default: no NMS
    assert len(filter_detections([a, b], nms_threshold=0.5)["circle"]) == 1


# ---------------------------------------------------------------- every tag


def test_single_object():
    meta = single_object("circle")
    assert scores(meta, [det("circle")]) == (1.0, True, True)
    assert scores(meta, []) == (0.0, False, False)
    assert scores(meta, [det("square")]) == (0.0, False, False)
    # confidence must exceed 0.3
    assert scores(meta, [det("circle", conf=0.3)]) == (0.0, False, False)
    # two circles: GenEval only asks for >= 1 (correct), strict wants exactly 1;
    # count credit 1 - |1 - 2| / 1 = 0
    assert scores(meta, [det("circle"), det("circle", at(20, 0))]) == (0.0, False, True)


def test_two_object():
    meta = two_object("circle", "square")
    assert scores(meta, [det("circle"), det("square", at(20, 0))]) == (1.0, True, True)
    assert scores(meta, [det("circle")]) == (0.5, False, False)


def test_counting_uses_the_09_threshold_and_exclude():
    meta = counting("square", 2)
    assert meta["exclude"] == [{"class": "square", "count": 3}]
    two = [det("square", at(0, 0)), det("square", at(20, 0))]
    assert scores(meta, two) == (1.0, True, True)
    # 0.85 passes 0.3 but not the counting threshold 0.9: nothing is found
    weak = [det("square", at(0, 0), conf=0.85), det("square", at(20, 0), conf=0.85)]
    # count credit 0, exclude holds (0 < 3) -> (0 + 1) / 2
    assert scores(meta, weak) == (0.5, False, False)
    # three squares: count 1 - 1/2 = 0.5, exclude fails -> 0.25; GenEval's exclude rejects it
    three = two + [det("square", at(0, 20))]
    assert scores(meta, three) == (0.25, False, False)
    # one square: count 0.5, exclude 1 -> 0.75
    assert scores(meta, two[:1]) == (0.75, False, False)
    # without exclude clauses the partial score is the count credit alone (Flow-GRPO)
    assert partial_score(meta, three, exclude_clauses=False) == 0.5
    assert clause_credits(meta, three) == [("count", 0.5), ("exclude", 0.0)]


def test_colors():
    meta = colors("circle", "red")
    assert scores(meta, [det("circle", color="red")]) == (1.0, True, True)
    # count 1, colour 0
    assert scores(meta, [det("circle", color="blue")]) == (0.5, False, False)
    # GenEval checks the colour of the most confident circle only
    red_first = [det("circle", color="red", conf=0.95), det("circle", at(20, 0), color="blue", conf=0.9)]
    blue_first = [det("circle", color="red", conf=0.9), det("circle", at(20, 0), color="blue", conf=0.95)]
    assert geneval_correct(meta, red_first) is True
    assert geneval_correct(meta, blue_first) is False
    # strict: count 2 != 1 -> count credit 0, colour credit 0 (wrong count)
    assert scores(meta, red_first) == (0.0, False, True)


def test_color_attr():
    meta = color_attr("circle", "red", "square", "blue")
    right = [det("circle", color="red"), det("square", at(20, 0), color="blue")]
    swapped = [det("circle", color="blue"), det("square", at(20, 0), color="red")]
    assert scores(meta, right) == (1.0, True, True)
    # two count clauses 1, two colour clauses 0
    assert scores(meta, swapped) == (0.5, False, False)
    # one of two colours right
    half = [det("circle", color="red"), det("square", at(20, 0), color="red")]
    assert scores(meta, half) == (0.75, False, False)
    assert clause_credits(meta, half) == [("count", 1.0), ("color", 1.0), ("count", 1.0), ("color", 0.0)]


@pytest.mark.parametrize(
    "relation, circle_box",
    [("left of", at(0, 20)), ("right of", at(40, 20)), ("above", at(20, 0)), ("below", at(20, 40))],
)
def test_position_each_relation(relation, circle_box):
    meta = position("circle", relation, "square")  # the square is clause 0
    square = det("square", at(20, 20))
    assert scores(meta, [square, det("circle", circle_box)]) == (1.0, True, True)
    opposite = {"left of": at(40, 20), "right of": at(0, 20), "above": at(20, 40), "below": at(20, 0)}[relation]
    # counts right, relation wrong: (1 + 1 + 0) / 3
    partial, strict, correct = scores(meta, [square, det("circle", opposite)])
    assert partial == pytest.approx(2 / 3) and not strict and not correct


def test_position_without_target_and_with_several_objects():
    meta = position("circle", "left of", "square")
    # no square: square count 0, circle count 1, position 0 (no matched target)
    partial, strict, correct = scores(meta, [det("circle", at(0, 0))])
    assert partial == pytest.approx(1 / 3) and not strict and not correct
    two_circles = {
        "tag": "position",
        "include": [{"class": "square", "count": 1}, {"class": "circle", "count": 2, "position": ["left of", 0]}],
        "prompt": "two circles left of a square",
    }
    square = det("square", at(40, 20))
    both_left = [square, det("circle", at(0, 0)), det("circle", at(0, 40))]
    one_right = [square, det("circle", at(0, 0)), det("circle", at(80, 20))]
    assert scores(two_circles, both_left) == (1.0, True, True)
    # every circle must be left of every square
    assert scores(two_circles, one_right)[1:] == (False, False)


def test_exclude_clause_of_another_class():
    meta = {
        "tag": "single_object",
        "include": [{"class": "circle", "count": 1}],
        "exclude": [{"class": "square", "count": 1}],
        "prompt": "a circle and no square",
    }
    assert scores(meta, [det("circle")]) == (1.0, True, True)
    with_square = [det("circle"), det("square", at(20, 0))]
    assert scores(meta, with_square) == (0.5, False, False)
    assert partial_score(meta, with_square, exclude_clauses=False) == 1.0
    # below threshold the square is not detected, so the exclude clause holds
    assert geneval_correct(meta, [det("circle"), det("square", at(20, 0), conf=0.2)]) is True


def test_unclipped_count_matches_reward_server():
    meta = single_object("circle")
    three = [det("circle", at(0, 0)), det("circle", at(20, 0)), det("circle", at(40, 0))]
    assert partial_score(meta, three) == 0.0
    assert partial_score(meta, three, clip_count=False) == -1.0


def test_pregrouped_detections_are_used_as_given():
    meta = counting("circle", 2)
    grouped = {"circle": [det("circle", conf=0.5), det("circle", at(20, 0), conf=0.4)]}
    # a pre-filtered map skips thresholding (0.5 < 0.9 would otherwise drop both)
    assert geneval_correct(meta, grouped) is True


def test_bad_metadata_raises():
    with pytest.raises(ValueError, match="include"):
        partial_score({"tag": "x"}, [])
    with pytest.raises(ValueError, match="relation"):
        geneval_correct({"include": [{"class": "a", "count": 1}, {"class": "b", "count": 1, "position": ["near", 0]}]}, [])


def test_strict_implies_correct_and_partial_is_bounded_on_random_cases():
    rng = np.random.default_rng(0)
    prompts = [m for rows in enumerate_prompts().values() for m in rows]
    shapes, palette = ["circle", "square", "triangle"], ["red", "blue", "green"]
    for _ in range(600):
        meta = prompts[rng.integers(len(prompts))]
        dets = []
        for _ in range(rng.integers(0, 5)):
            x, y, s = rng.uniform(0, 40, size=3)
            dets.append(
                det(str(rng.choice(shapes)), (x, y, x + s + 4, y + s + 4), str(rng.choice(palette)), float(rng.uniform(0, 1)))
            )
        p, strict, correct = scores(meta, dets)
        assert 0.0 <= p <= 1.0 and not math.isnan(p)
        assert (not strict) or correct
        assert strict == (p == 1.0)
