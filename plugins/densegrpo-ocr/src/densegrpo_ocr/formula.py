"""Flow-GRPO's OCR reward formula (method.md section 5; flow_grpo/ocr.py).

* target = the text between the first pair of double quotes in the prompt;
* recognised = the OCR lines joined (no separator);
* both lower-cased with spaces removed;
* ``d = 0`` if target is a substring of recognised, else ``Levenshtein(recognised, target)``;
* ``d = min(d, len(target))``; reward ``= 1 - d / len(target)``, in [0, 1].

Not applicable (NaN): a prompt without a closed pair of double quotes, or whose quoted text is
empty once spaces are removed (Flow-GRPO would crash on the first and divide by zero on the second).
"""

from __future__ import annotations

import math

from rapidfuzz.distance import Levenshtein


def extract_target(prompt: str) -> str | None:
    """The text between the first pair of ``"`` in ``prompt``, or ``None`` when there is no pair."""
    parts = prompt.split('"')
    return parts[1] if len(parts) >= 3 else None


def normalise(text: str) -> str:
    """Lower-case and drop spaces, as Flow-GRPO does before comparing."""
    return text.replace(" ", "").lower()


def ocr_reward(recognised: str, target: str | None) -> float:
    """``1 - min(d, len(target)) / len(target)`` with ``d = 0`` for a substring match.

    ``recognised`` is the OCR lines joined; ``target`` the quoted prompt text (``None`` -> NaN).
    """
    if target is None:
        return math.nan
    target = normalise(target)
    if not target:
        return math.nan
    recognised = normalise(recognised)
    distance = 0 if target in recognised else Levenshtein.distance(recognised, target)
    distance = min(distance, len(target))
    return 1.0 - distance / len(target)
