"""What a scorer of the `generate` kind is: one file per scorer in this package, registered by `register`.

A scorer turns one prediction and its references into per-item score columns (each column's mean is a
metric), names its default main metric, and may add corpus-level metrics computed from per-item sufficient
statistics it also writes as columns (translation's corpus chrF / BLEU). The task's `scorer:` option picks
one by name; a scorer in another package registers through the entry-point group
`forgetless.generate_scorers`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ...metrics import Columns, Metric


@dataclass(frozen=True)
class Scorer:
    name: str
    columns: tuple[str, ...]  # per-item score columns, each also a mean-over-items metric
    default_main: str
    score: Callable[[Any, str, list[str]], dict[str, float]]  # (task, prediction, references) -> columns
    discrete: bool = False  # right/wrong items: the comparison lists the items that flipped
    corpus: tuple[str, ...] = ()  # corpus-level metrics it adds
    corpus_metrics: Callable[[Columns], list[Metric]] | None = None  # those metrics, from (cached) columns

    @property
    def metrics(self) -> tuple[str, ...]:
        """Every metric the scorer reports: its columns' means, then its corpus-level scores."""
        return self.columns + self.corpus


SCORERS: dict[str, Scorer] = {}


def register(scorer: Scorer) -> Scorer:
    if scorer.name in SCORERS:
        raise ValueError(f"generate scorer {scorer.name!r} is registered twice")
    if scorer.default_main not in scorer.metrics:
        raise ValueError(f"generate scorer {scorer.name!r}: default_main {scorer.default_main!r} is not one of "
                         f"its metrics {scorer.metrics}")
    SCORERS[scorer.name] = scorer
    return scorer
