"""Text helpers: normalisation, words, degenerate answers, small statistics."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .common import APOSTROPHES, REFUSAL_PHRASES, WORD


def normalize(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, stripped: the exact-duplicate key."""
    return " ".join(text.lower().split())


def words(text: str) -> list[str]:
    """Normalised word tokens (lower-cased `\\w+` runs; punctuation dropped)."""
    return WORD.findall(text.lower())


def degenerate_reason(answer: str) -> str | None:
    """Why an answer is useless as a training target, or None. See docs/data-check.md."""
    if answer == "":
        return "empty"
    if not answer.strip():
        return "whitespace"
    stripped = answer.strip()
    first = stripped.split(None, 1)[0]
    if len(first) == len(stripped):  # a single token
        if len(first) >= 4 and len(set(first)) == 1 and not first.isdigit():
            return "repeated_char"
    elif stripped.count(first) >= 3:  # cheap pre-filter before splitting a long answer
        tokens = stripped.split()
        if len(tokens) >= 3 and len(set(tokens)) == 1:
            return "repeated_token"
    low = answer.lower()
    if "\u2019" in low or "\u2018" in low or "\u02bc" in low:
        low = low.translate(APOSTROPHES)
    if any(p in low for p in REFUSAL_PHRASES):
        return "refusal"
    return None


def jaccard(a: np.ndarray, b: np.ndarray) -> float:
    inter = np.intersect1d(a, b, assume_unique=True).size
    return inter / (a.size + b.size - inter)


def percentiles(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    s = sorted(values)

    def rank(p: float) -> int:
        return s[max(0, math.ceil(p * len(s)) - 1)]

    return {"count": len(s), "min": s[0], "p10": rank(0.10), "p50": rank(0.50), "p90": rank(0.90),
            "p99": rank(0.99), "max": s[-1], "mean": round(sum(s) / len(s), 1)}


def snippet(text: str, n: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[: n - 1] + "…"


class UnionFind:
    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        p = self.parent
        while p[x] != x:
            p[x] = p[p[x]]
            x = p[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if rb < ra:
            ra, rb = rb, ra
        self.parent[rb] = ra  # the smaller index (earliest record) stays the root
        return ra
