"""rouge: ROUGE-1/2/L F-measure (Google's `rouge-score`, Porter stemming unless `rouge_stemmer: false`), each the
best over the references."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from typing import Any

from .scorer import Scorer, register

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


@lru_cache(maxsize=4)
def _rouge_scorer(stemmer: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stemmer)


def rouge_scores(pred: str, refs: Sequence[str], stemmer: bool = True) -> dict[str, float]:
    """ROUGE-1/2/L F-measure of a prediction, each the maximum over the references (0-1 scale)."""
    scorer = _rouge_scorer(stemmer)
    per_ref = [scorer.score(ref, pred) for ref in refs]
    return {t: max(s[t].fmeasure for s in per_ref) for t in ROUGE_TYPES}


def _score(task: Any, pred: str, golds: list[str]) -> dict[str, float]:
    return rouge_scores(pred, golds, task.rouge_stemmer)


register(Scorer("rouge", ROUGE_TYPES, "rougeL", _score))
