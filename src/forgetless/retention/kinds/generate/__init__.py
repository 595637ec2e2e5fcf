"""generate: greedy generation with stop sequences, scored against reference answers.

Scorers (`scorer:`; by default `qa`, or `numeric` where `answer_type: numeric`), one module each in this
package (see `scorer.py` for what one is):

- qa: exact_match and contains (SQuAD-normalised: lower case, no punctuation or articles), token F1
  (best over aliases).
- numeric: the final number of the prediction equals the gold number (GSM8K-style: "#### 42" is 42).
- rouge: ROUGE-1/2/L F-measure (Google's `rouge-score`, Porter stemming), the best over the references.
- translation: sentence chrF and sentence BLEU per item, and corpus-level chrF and BLEU computed from per-item
  sufficient statistics (so bootstrap intervals are over corpus-level scores).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ....errors import DataError
from ....plugins import discover
from ...lm import greedy_generate
from ...metrics import Columns, Metric, mean_of
from ...tasks import TaskBase, TaskResult, as_array, item_id, pick_shots, render, rows_and_shot_pool
from ..base import EvalContext, encode
from ..prompting import chat_ids, gold_answers, prompt_of, shots_text, use_chat
from .scorer import SCORERS, Scorer

discover(__name__, __path__, helpers={"scorer"}, group="forgetless.generate_scorers")


class GenerateTask(TaskBase):
    kind: Literal["generate"] = "generate"
    prompt: str = "Question: {{question}}\nAnswer:"
    answers: str | list[str] = Field(
        "answer",
        description="Field or template giving the gold answer(s): a string or a list of aliases/references; or a "
        "list of fields/templates, one reference each (e.g. [summary1, summary2, summary3]).",
    )
    answer_type: Literal["aliases", "numeric"] = "aliases"
    scorer: str | None = Field(
        None,
        description="qa (exact_match, contains, f1), numeric, rouge (ROUGE-1/2/L F), translation (chrF, BLEU; "
        "sentence and corpus level), or a scorer a plugin registers. Default: numeric when answer_type is "
        "numeric, else qa.",
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
    main_metric: str | None = Field(None, description="One of the scorer's metrics (default: the scorer's main).")

    @field_validator("scorer")
    @classmethod
    def _known_scorer(cls, v: str | None) -> str | None:
        if v is not None and v not in SCORERS:
            raise ValueError(f"unknown scorer {v!r}; one of {', '.join(SCORERS)}")
        return v

    @model_validator(mode="after")
    def _check_scorer(self) -> GenerateTask:
        if self.answer_type == "numeric" and self.scorer not in (None, "numeric"):
            raise ValueError(f"answer_type: numeric conflicts with scorer: {self.scorer}; drop one of them")
        if self.main_metric is not None and self.main_metric not in self.scoring.metrics:
            raise ValueError(
                f"main_metric {self.main_metric!r} is not reported by scorer {self.resolved_scorer!r} "
                f"({', '.join(self.scoring.metrics)})"
            )
        return self

    @property
    def resolved_scorer(self) -> str:
        """The scorer in use: `scorer`, else what `answer_type` implies."""
        return self.scorer or ("numeric" if self.answer_type == "numeric" else "qa")

    @property
    def scoring(self) -> Scorer:
        return SCORERS[self.resolved_scorer]

    @property
    def main(self) -> str:
        """The metric the retention score uses: `main_metric`, else the scorer's default."""
        return self.main_metric or self.scoring.default_main


def _golds(task: GenerateTask, rec: Any) -> list[str]:
    return gold_answers(task.answers, rec, task.name)


def _prompt_ids(task: GenerateTask, ctx: EvalContext, text: str) -> list[int]:
    if use_chat(task.chat, ctx.tokenizer, task.name):
        return chat_ids(ctx.tokenizer, [{"role": "user", "content": text}])
    return encode(ctx.tokenizer, text)


def _shot_answer(task: GenerateTask, rec: Any) -> str:
    if task.fewshot_answer:
        return str(render(task.fewshot_answer, rec, task.name, "fewshot_answer"))
    return _golds(task, rec)[0]


def metrics(cols: Columns, task: Any = None) -> list[Metric]:
    """The metrics of a column set: the mean of every scorer's per-item column present, then each scorer's
    corpus-level metrics whose statistics are present (so cached results restore with the same metrics)."""
    scores = {c for s in SCORERS.values() for c in s.columns}
    out = [mean_of(n) for n in cols if n in scores]
    for s in SCORERS.values():
        if s.corpus_metrics is not None:
            out += s.corpus_metrics(cols)
    return out


def run(task: GenerateTask, ctx: EvalContext) -> TaskResult:
    rows, pool = rows_and_shot_pool(task, ctx.data_root)
    prompts, golds = [], []
    for k, rec in enumerate(rows):
        shots = pick_shots(pool, task.shots, task.seed + k, exclude=rec)  # never the item itself
        prefix = shots_text(task, shots, lambda s: _shot_answer(task, s))
        prompts.append(_prompt_ids(task, ctx, prefix + prompt_of(task, rec)))
        golds.append(_golds(task, rec))
    window = ctx.window() - task.max_new_tokens
    if window < 1:  # p[-0:] would be the whole prompt, a negative window a wrong slice
        raise DataError(f"task {task.name}: max_new_tokens {task.max_new_tokens} leaves no room for a prompt in the "
                        f"{ctx.window()}-token window (the model's context, or max_length): lower it")
    truncated = sum(len(p) > window for p in prompts)
    prompts = [p[-window:] for p in prompts]
    outs = greedy_generate(
        ctx.model, ctx.tokenizer, prompts, max_new_tokens=task.max_new_tokens, stop=task.stop,
        batch_size=task.batch_size, bf16=ctx.bf16, progress=ctx.track(task.name, len(prompts)),
    )
    per_item = []
    details = []
    main, scoring = task.main, task.scoring
    for rec, out, gold in zip(rows, outs, golds, strict=True):
        pred = ctx.tokenizer.decode(out, skip_special_tokens=True).strip()
        s = scoring.score(task, pred, gold)
        per_item.append(s)
        d: dict[str, Any] = {"id": item_id(rec), "where": rec.where, "gold": gold[0], "prediction": pred}
        if scoring.discrete:  # right/wrong items: the comparison lists those that flipped
            d["correct"] = bool(s[main])
        else:
            d.update({k: round(s[k], 4) for k in scoring.columns})
        details.append(d)
    cols = {n: as_array([s[n] for s in per_item]) for n in per_item[0]}
    return TaskResult.of(task, cols, metrics(cols, task), [d["id"] for d in details], details,
                         {"left_truncated": truncated}, main=main)
