"""translation: sentence chrF and sentence BLEU per item (sacrebleu, the `sentence_chrf` / `sentence_bleu`
settings), and the corpus-level chrF and BLEU (`corpus_chrf`, `corpus_bleu`).

Corpus scores are not means of sentence scores: each item keeps sacrebleu's sufficient statistics as columns
(n-gram matches and totals, lengths) and the corpus metric sums them over the (resampled) items and lets
sacrebleu compute the score, so bootstrap intervals and paired tests are over corpus-level scores.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from ....errors import ForgetlessError
from ...metrics import Columns, Metric
from .scorer import Scorer, register

BLEU_ORDER = 4  # sacrebleu's max n-gram order


@lru_cache(maxsize=16)
def _bleu(tokenize: str, effective_order: bool) -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize, effective_order=effective_order)


@lru_cache(maxsize=16)
def _chrf(char_order: int = 6, word_order: int = 0) -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF(char_order=char_order, word_order=word_order)


def bleu_tokenizer(task: Any) -> str:
    """sacrebleu's tokenizer for BLEU: the task's choice, else sacrebleu's per-language default (zh, ja, ko)."""
    if task.bleu_tokenize:
        return task.bleu_tokenize
    from sacrebleu.metrics import BLEU

    return BLEU._TOKENIZER_MAP.get(task.target_lang or "", BLEU.TOKENIZER_DEFAULT)


def bleu_stat_names(order: int = BLEU_ORDER) -> list[str]:
    """Columns of sacrebleu's BLEU sufficient statistics, in its order: lengths, matches, totals per n."""
    return ["bleu_sys_len", "bleu_ref_len"] + [f"bleu_correct_{n}" for n in range(1, order + 1)] + [
        f"bleu_total_{n}" for n in range(1, order + 1)
    ]


def chrf_stat_names(char_order: int = 6, word_order: int = 0) -> list[str]:
    """Columns of sacrebleu's chrF statistics: [hyp, ref, match] n-gram counts per character then word order."""
    orders = [f"c{n}" for n in range(1, char_order + 1)] + [f"w{n}" for n in range(1, word_order + 1)]
    return [f"chrf_{what}_{o}" for o in orders for what in ("hyp", "ref", "match")]


def translation_scores(
    pred: str, refs: Sequence[str], tokenize: str = "13a", char_order: int = 6, word_order: int = 0
) -> dict[str, float]:
    """Sentence chrF and BLEU (as sacrebleu's sentence_chrf / sentence_bleu) plus the sufficient statistics
    that corpus-level chrF / BLEU sum over items."""
    streams = [[r] for r in refs]
    bleu_stats = _bleu(tokenize, True)._extract_corpus_statistics([pred], streams)[0]
    chrf = _chrf(char_order, word_order)
    chrf_stats = chrf._extract_corpus_statistics([pred], streams)[0]
    out = {
        "chrf": float(chrf._compute_score_from_stats(list(chrf_stats)).score),
        "bleu": float(_bleu(tokenize, True)._compute_score_from_stats(list(bleu_stats)).score),
    }
    out.update(zip(bleu_stat_names(), map(float, bleu_stats), strict=True))
    out.update(zip(chrf_stat_names(char_order, word_order), map(float, chrf_stats), strict=True))
    return out


def _stats_metric(name: str, stat_cols: list[str], score: Callable[[list[int]], float]) -> Metric:
    """A corpus-level metric: sum each statistic over the items, then score; any leading (bootstrap) shape."""

    def fn(c: Columns) -> np.ndarray:
        summed = np.stack([c[k].sum(axis=-1) for k in stat_cols], axis=-1)
        flat = np.rint(summed.reshape(-1, len(stat_cols))).astype(np.int64)
        return np.asarray([score(row.tolist()) for row in flat], dtype=np.float64).reshape(summed.shape[:-1])

    return Metric(name, True, fn)


def corpus_bleu_metric(order: int = BLEU_ORDER) -> Metric:
    """sacrebleu's corpus BLEU (exp smoothing, no effective order) from per-item statistics."""
    bleu = _bleu("13a", False)  # the tokenizer only matters when statistics are extracted
    if order != bleu.max_ngram_order:
        raise ForgetlessError(f"corpus BLEU: {order}-gram statistics, sacrebleu's default order is "
                              f"{bleu.max_ngram_order}")
    return _stats_metric("corpus_bleu", bleu_stat_names(order),
                         lambda s: float(bleu._compute_score_from_stats(s).score))


def corpus_chrf_metric(char_order: int = 6, word_order: int = 0) -> Metric:
    """sacrebleu's corpus chrF (beta 2) from per-item statistics."""
    chrf = _chrf(char_order, word_order)
    return _stats_metric("corpus_chrf", chrf_stat_names(char_order, word_order),
                         lambda s: float(chrf._compute_score_from_stats(s).score))


def _orders(cols: Columns, prefix: str) -> int:
    return sum(1 for k in cols if k.startswith(prefix))


def corpus_metrics(cols: Columns) -> list[Metric]:
    """Corpus chrF / BLEU where their statistics are columns (so cached results restore the same metrics)."""
    out = []
    if "chrf_hyp_c1" in cols:
        out.append(corpus_chrf_metric(_orders(cols, "chrf_hyp_c"), _orders(cols, "chrf_hyp_w")))
    if "bleu_sys_len" in cols:
        out.append(corpus_bleu_metric(_orders(cols, "bleu_correct_")))
    return out


def _score(task: Any, pred: str, golds: list[str]) -> dict[str, float]:
    return translation_scores(pred, golds, bleu_tokenizer(task), word_order=task.chrf_word_order)


register(Scorer("translation", ("chrf", "bleu"), "corpus_chrf", _score, corpus=("corpus_chrf", "corpus_bleu"),
                corpus_metrics=corpus_metrics))
