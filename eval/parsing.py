"""Turn generated text into answers: yes/no (POPE), true/false (VSR), a box (RefCOCO).

Every parser accepts any string and never raises; a text it cannot read gives ``None``, which the
task counts as a parse failure (and as a wrong answer).
"""
from __future__ import annotations

import re
from typing import Optional

_NO_WORDS = ("No", "no", "not")


def parse_yes_no(text: str) -> str:
    """POPE's reference parser: text -> "yes" | "no" (never fails).

    Keep the text before the first '.', drop commas, split on single spaces; the answer is "no" if
    any word is exactly "No", "no" or "not", else "yes" (so an empty or off-topic answer is "yes",
    as in the reference ``evaluate.py``).
    """
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if any(w in _NO_WORDS for w in words) else "yes"


_TRUE_FALSE = re.compile(r"\b(?:(not)\s+)?(true|false|yes|no|correct|incorrect|wrong)\b", re.IGNORECASE)
_TF_VALUE = {"true": True, "yes": True, "correct": True, "false": False, "no": False, "incorrect": False,
             "wrong": False}


def parse_true_false(text: str) -> Optional[bool]:
    """A VSR answer: the first of true/false (or yes/no, correct/incorrect/wrong) as a whole word,
    case-insensitive -> True | False, flipped when "not" directly precedes it ("not true" is
    False); None when the text holds none of them."""
    if not isinstance(text, str):
        return None
    m = _TRUE_FALSE.search(text)
    if m is None:
        return None
    value = _TF_VALUE[m.group(2).lower()]
    return not value if m.group(1) else value


_NUM = r"\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*"
_BOX = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def parse_box(text: str) -> Optional[tuple[float, float, float, float]]:
    """The first "[a, b, c, d]" of four numbers in ``text`` -> (x1, y1, x2, y2) floats; else None.

    Like lmms-eval's RefCOCO reader (``parse_float_sequence_within``), but a missing box is None
    (counted as unparseable) instead of a silent [0, 0, 0, 0]. Non-finite values give None.
    """
    if not isinstance(text, str):
        return None
    m = _BOX.search(text)
    if m is None:
        return None
    try:
        box = tuple(float(g) for g in m.groups())
    except (ValueError, OverflowError):
        return None
    if not all(v == v and abs(v) != float("inf") for v in box):
        return None
    return box  # type: ignore[return-value]
