"""qa: exact_match and contains (SQuAD-normalised: lower case, no punctuation or articles), and token F1, each
the best over the gold aliases."""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Any

from .scorer import Scorer, register


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if not p or not g:
        return float(p == g)
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def qa_scores(pred: str, golds: list[str]) -> dict[str, float]:
    """exact_match, contains and f1 of one prediction against its aliases."""
    npred = normalize(pred)
    return {
        "exact_match": float(any(npred == normalize(g) for g in golds)),
        "contains": float(any(normalize(g) and normalize(g) in npred for g in golds)),
        "f1": max(token_f1(pred, g) for g in golds),
    }


def _score(task: Any, pred: str, golds: list[str]) -> dict[str, float]:
    return qa_scores(pred, golds)


register(Scorer("qa", ("exact_match", "contains", "f1"), "exact_match", _score, discrete=True))
