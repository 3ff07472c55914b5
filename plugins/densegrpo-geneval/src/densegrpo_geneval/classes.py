"""GenEval's vocabulary: the 80 COCO object names as GenEval's prompts spell them, and its 10 colours."""

from __future__ import annotations

GENEVAL_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella",
    "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant",
    "bed", "dining table", "toilet", "tv", "laptop", "computer mouse", "tv remote",
    "computer keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator",
    "book", "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip
"""GenEval's ``object_names.txt``: COCO's 80 thing classes in COCO's contiguous label order.

A COCO detector's label ``i`` is ``GENEVAL_CLASSES[i]`` (GenEval indexes its detector's
per-class results the same way). GenEval renames three COCO classes: ``mouse`` -> ``computer
mouse``, ``remote`` -> ``tv remote``, ``keyboard`` -> ``computer keyboard``.
"""

COLORS: tuple[str, ...] = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
"""GenEval's colour words (``COLORS`` in ``evaluation/evaluate_images.py``)."""

COLOR_TEMPLATES: tuple[str, ...] = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
"""GenEval's zero-shot colour prompts, averaged per colour (clip_benchmark's classifier)."""


def class_names_for(id2label: dict[int, str]) -> list[str]:
    """Label names of a detector: GenEval's names for an 80-class COCO head, else the model's own."""
    if len(id2label) == len(GENEVAL_CLASSES):
        return list(GENEVAL_CLASSES)
    return [id2label[i] for i in range(len(id2label))]
