"""numeric: the final number of the prediction equals the gold number (GSM8K-style: "#### 42" is 42)."""

from __future__ import annotations

import re
from typing import Any

from .scorer import Scorer, register

_NUM = re.compile(r"-?\d[\d,]*\.?\d*")


def parse_number(text: str) -> float | None:
    if "####" in text:
        text = text.split("####")[-1]
    found = _NUM.findall(text)
    if not found:
        return None
    try:
        return float(found[-1].replace(",", "").rstrip("."))
    except ValueError:
        return None


def numeric_score(pred: str, gold: str) -> dict[str, float]:
    g, p = parse_number(gold), parse_number(pred)
    return {"numeric": float(g is not None and p is not None and abs(g - p) < 1e-6)}


def _score(task: Any, pred: str, golds: list[str]) -> dict[str, float]:
    return numeric_score(pred, golds[0])


register(Scorer("numeric", ("numeric",), "numeric", _score, discrete=True))
