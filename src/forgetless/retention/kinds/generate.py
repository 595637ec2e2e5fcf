"""generate: greedy generation with stop sequences, scored against reference answers.

Scorers (`scorer:`; by default `qa`, or `numeric` where `answer_type: numeric`):

- qa: exact_match and contains (SQuAD-normalised: lower case, no punctuation or articles), token F1
  (best over aliases).
- numeric: the final number of the prediction equals the gold number (GSM8K-style: "#### 42" is 42).
- rouge: ROUGE-1/2/L F-measure (Google's `rouge-score`, Porter stemming), the best over the references.
- translation: sentence chrF and sentence BLEU per item (sacrebleu, the `sentence_chrf` / `sentence_bleu`
  settings), and the corpus-level chrF and BLEU (`corpus_chrf`, `corpus_bleu`). Corpus scores are not means
  of sentence scores: each item keeps sacrebleu's sufficient statistics as columns (n-gram matches and
  totals, lengths) and the corpus metric sums them over the (resampled) items and lets sacrebleu compute the
  score, so bootstrap intervals and paired tests are over corpus-level scores.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from ...errors import DataError, ForgetlessError
from ..lm import greedy_generate
from ..metrics import Columns, Metric, mean_of
from ..tasks import (
    TaskBase,
    TaskResult,
    as_array,
    fewshot_pool,
    item_id,
    load_rows,
    pick_shots,
    render,
    sample_rows,
)
from .base import EvalContext, encode

Scorer = Literal["qa", "numeric", "rouge", "translation"]
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
#: Per-item score columns of each scorer (each is also a mean-over-items metric).
SCORER_COLUMNS: dict[str, tuple[str, ...]] = {
    "qa": ("exact_match", "contains", "f1"),
    "numeric": ("numeric",),
    "rouge": ROUGE_TYPES,
    "translation": ("chrf", "bleu"),
}
#: Every metric a scorer reports (the columns' means plus the corpus-level scores).
SCORER_METRICS: dict[str, tuple[str, ...]] = {**SCORER_COLUMNS,
                                              "translation": ("chrf", "corpus_chrf", "bleu", "corpus_bleu")}
DEFAULT_MAIN = {"qa": "exact_match", "numeric": "numeric", "rouge": "rougeL", "translation": "corpus_chrf"}
BLEU_ORDER = 4  # sacrebleu's max n-gram order


class GenerateTask(TaskBase):
    kind: Literal["generate"] = "generate"
    prompt: str = "Question: {{question}}\nAnswer:"
    answers: str | list[str] = Field(
        "answer",
        description="Field or template giving the gold answer(s): a string or a list of aliases/references; or a "
        "list of fields/templates, one reference each (e.g. [summary1, summary2, summary3]).",
    )
    answer_type: Literal["aliases", "numeric"] = "aliases"
    scorer: Scorer | None = Field(
        None,
        description="qa (exact_match, contains, f1), numeric, rouge (ROUGE-1/2/L F), translation (chrF, BLEU; "
        "sentence and corpus level). Default: numeric when answer_type is numeric, else qa.",
    )
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_answer: str | None = Field(None, description="Template of the answer shown in few-shot examples (default: "
                                                         "first alias).")
    chat: bool | Literal["auto"] = Field(
        False, description="Wrap the prompt in the tokenizer's chat template; auto: when the tokenizer has one."
    )
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(32, gt=0, description="Prompts generated at once (larger is faster on CPU: per-step "
                                                  "overhead dominates).")
    rouge_stemmer: bool = Field(True, description="rouge: Porter stemming (the standard setting).")
    bleu_tokenize: str | None = Field(
        None, description="translation: sacrebleu BLEU tokenizer (13a, zh, intl, char, ...). Default: from "
        "target_lang, else 13a."
    )
    target_lang: str | None = Field(None, description="translation: target language code (zh, ja, ko choose BLEU's "
                                                      "tokenizer).")
    chrf_word_order: int = Field(0, ge=0, le=6, description="translation: chrF word n-gram order (2 gives chrF++).")
    main_metric: (
        Literal["exact_match", "contains", "f1", "numeric", "rouge1", "rouge2", "rougeL", "chrf", "corpus_chrf", "bleu",
                "corpus_bleu"]
        | None
    ) = None

    @model_validator(mode="after")
    def _check_scorer(self) -> GenerateTask:
        if self.answer_type == "numeric" and self.scorer not in (None, "numeric"):
            raise ValueError(f"answer_type: numeric conflicts with scorer: {self.scorer}; drop one of them")
        if self.main_metric is not None and self.main_metric not in SCORER_METRICS[self.resolved_scorer]:
            raise ValueError(
                f"main_metric {self.main_metric!r} is not reported by scorer {self.resolved_scorer!r} "
                f"({', '.join(SCORER_METRICS[self.resolved_scorer])})"
            )
        return self

    @property
    def resolved_scorer(self) -> str:
        """The scorer in use: `scorer`, else what `answer_type` implies."""
        return self.scorer or ("numeric" if self.answer_type == "numeric" else "qa")

    @property
    def main(self) -> str:
        """The metric the retention score uses: `main_metric`, else the scorer's default."""
        return self.main_metric or DEFAULT_MAIN[self.resolved_scorer]


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


def score_prediction(pred: str, golds: list[str], answer_type: str) -> dict[str, float]:
    """qa / numeric scores of one prediction (`answer_type`: aliases or numeric)."""
    if answer_type == "numeric":
        g, p = parse_number(golds[0]), parse_number(pred)
        return {"numeric": float(g is not None and p is not None and abs(g - p) < 1e-6)}
    npred = normalize(pred)
    return {
        "exact_match": float(any(npred == normalize(g) for g in golds)),
        "contains": float(any(normalize(g) and normalize(g) in npred for g in golds)),
        "f1": max(token_f1(pred, g) for g in golds),
    }


def _golds(task: GenerateTask, rec) -> list[str]:
    return gold_answers(task.answers, rec, task.name)


def gold_answers(answers: str | list[str], rec, task: str) -> list[str]:
    """The non-empty gold answers of a record: `answers` is a field/template (a string or a list), or a list
    of fields/templates giving one answer each."""
    golds: list[str] = []
    for template in [answers] if isinstance(answers, str) else answers:
        value = render(template, rec, task, "answers")
        if isinstance(value, dict):  # TriviaQA layout {"value": ..., "aliases": [...]}
            value = [value.get("value", "")] + list(value.get("aliases", []))
        golds += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    golds = [g for g in golds if g.strip()]
    if not golds:
        raise DataError(f"{rec.where}: task {task}: no gold answer")
    return golds


def use_chat(chat: bool | str, tokenizer: Any, task: str) -> bool:
    """Whether to apply the chat template: true (the tokenizer must have one), false, or auto."""
    has = bool(getattr(tokenizer, "chat_template", None))
    if chat == "auto":
        return has
    if chat and not has:
        raise DataError(f"task {task}: chat: true but the tokenizer has no chat template")
    return bool(chat)


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of a conversation with the generation prompt for the assistant's next turn."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def _prompt_ids(task: GenerateTask, ctx: EvalContext, text: str) -> list[int]:
    if use_chat(task.chat, ctx.tokenizer, task.name):
        return chat_ids(ctx.tokenizer, [{"role": "user", "content": text}])
    return encode(ctx.tokenizer, text)


# ---------------------------------------------------------------- rouge / translation scorers


@lru_cache(maxsize=4)
def _rouge_scorer(stemmer: bool) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=stemmer)


def rouge_scores(pred: str, refs: Sequence[str], stemmer: bool = True) -> dict[str, float]:
    """ROUGE-1/2/L F-measure of a prediction, each the maximum over the references (0-1 scale)."""
    scorer = _rouge_scorer(stemmer)
    per_ref = [scorer.score(ref, pred) for ref in refs]
    return {t: max(s[t].fmeasure for s in per_ref) for t in ROUGE_TYPES}


@lru_cache(maxsize=16)
def _bleu(tokenize: str, effective_order: bool) -> Any:
    from sacrebleu.metrics import BLEU

    return BLEU(tokenize=tokenize, effective_order=effective_order)


@lru_cache(maxsize=16)
def _chrf(char_order: int = 6, word_order: int = 0) -> Any:
    from sacrebleu.metrics import CHRF

    return CHRF(char_order=char_order, word_order=word_order)


def bleu_tokenizer(task: GenerateTask) -> str:
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


def metrics(cols: Columns, task: Any = None) -> list[Metric]:
    """The metrics of a column set: the mean of every per-item score column, and corpus chrF / BLEU where
    their statistics are present (so cached results restore with the same metrics)."""
    scores = {c for cs in SCORER_COLUMNS.values() for c in cs}
    out = [mean_of(n) for n in cols if n in scores]
    if "chrf_hyp_c1" in cols:
        out.append(corpus_chrf_metric(_orders(cols, "chrf_hyp_c"), _orders(cols, "chrf_hyp_w")))
    if "bleu_sys_len" in cols:
        out.append(corpus_bleu_metric(_orders(cols, "bleu_correct_")))
    return out


def _score(task: GenerateTask, pred: str, golds: list[str]) -> dict[str, float]:
    scorer = task.resolved_scorer
    if scorer == "rouge":
        return rouge_scores(pred, golds, task.rouge_stemmer)
    if scorer == "translation":
        return translation_scores(pred, golds, bleu_tokenizer(task), word_order=task.chrf_word_order)
    return score_prediction(pred, golds, "numeric" if scorer == "numeric" else "aliases")


def run(task: GenerateTask, ctx: EvalContext) -> TaskResult:
    all_rows = load_rows(task, ctx.data_root)
    rows = sample_rows(task, all_rows)
    pool = fewshot_pool(task, all_rows, rows) if task.shots else []
    prompts, golds = [], []
    for k, rec in enumerate(rows):
        shots = pick_shots(pool, task.shots, task.seed + k, exclude=rec)  # never the item itself
        prefix = "".join(
            str(render(task.prompt, s, task.name, "prompt")) + task.target_delimiter
            + (str(render(task.fewshot_answer, s, task.name, "fewshot_answer")) if task.fewshot_answer
               else _golds(task, s)[0])
            + task.fewshot_delimiter
            for s in shots
        )
        prompts.append(_prompt_ids(task, ctx, prefix + str(render(task.prompt, rec, task.name, "prompt"))))
        golds.append(_golds(task, rec))
    window = ctx.window() - task.max_new_tokens
    truncated = sum(len(p) > window for p in prompts)
    prompts = [p[-window:] for p in prompts]
    outs = greedy_generate(
        ctx.model, ctx.tokenizer, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop,
        batch_size=task.batch_size, bf16=ctx.bf16, progress=ctx.track(task.name, len(prompts)),
    )
    per_item = []
    details = []
    main = task.main
    discrete = task.resolved_scorer in ("qa", "numeric")
    for rec, out, gold in zip(rows, outs, golds, strict=True):
        pred = ctx.tokenizer.decode(out, skip_special_tokens=True).strip()
        s = _score(task, pred, gold)
        per_item.append(s)
        d: dict[str, Any] = {"id": item_id(rec), "where": rec.where, "gold": gold[0], "prediction": pred}
        if discrete:  # right/wrong items: the comparison lists those that flipped
            d["correct"] = bool(s[main])
        else:
            d.update({k: round(s[k], 4) for k in SCORER_COLUMNS[task.resolved_scorer]})
        details.append(d)
    names = list(per_item[0])
    cols = {n: as_array([s[n] for s in per_item]) for n in names}
    return TaskResult(
        task=task.name,
        kind=task.kind,
        columns=cols,
        metrics=metrics(cols, task),
        main=main,
        item_ids=[d["id"] for d in details],
        details=details,
        info={"left_truncated": truncated},
    )
