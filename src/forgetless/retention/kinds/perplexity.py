"""perplexity: rolling log-likelihood over whole documents (lm-eval's `loglikelihood_rolling`).

Every token of a document is scored exactly once, in disjoint windows the size of the model's context
(capped by the evaluation's max_length). Reported: token perplexity, word perplexity, bits per byte.
Intervals resample documents.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ...errors import DataError
from ..lm import EngineStats, rolling_windows, score_requests
from ..metrics import LN2, Metric, per_unit, perplexity
from ..tasks import TaskBase, TaskResult, as_array, item_id, load_rows, render, sample_rows
from .base import EvalContext, encode, prefix_token


class PerplexityTask(TaskBase):
    kind: Literal["perplexity"] = "perplexity"
    text: str = Field("text", description="Field or template giving each document's text.")
    max_tokens: int | None = Field(None, gt=0, description="Score at most this many tokens per document (its start).")
    main_metric: Literal["perplexity", "word_perplexity", "bits_per_byte"] = "perplexity"


def metrics(cols, task=None) -> list[Metric]:
    return [
        perplexity("nll", "tokens", "perplexity"),
        perplexity("nll", "words", "word_perplexity"),
        per_unit("nll", "bytes", "bits_per_byte", 1 / LN2),
    ]


def run(task: PerplexityTask, ctx: EvalContext) -> TaskResult:
    rows = sample_rows(task, load_rows(task, ctx.data_root))
    docs = []
    for rec in rows:
        text = str(render(task.text, rec, task.name, "text"))
        ids = encode(ctx.tokenizer, text)
        if task.max_tokens and len(ids) > task.max_tokens:
            ids = ids[: task.max_tokens]
            text = ctx.tokenizer.decode(ids)
        if ids:
            docs.append((rec, text, ids))
    if not docs:
        raise DataError(f"task {task.name}: every document is empty")
    window = ctx.window()
    requests, owner = [], []
    for d, (_, _, ids) in enumerate(docs):
        for r in rolling_windows(ids, window, prefix_token(ctx.tokenizer)):
            requests.append(r)
            owner.append(d)
    stats = EngineStats()
    scores = score_requests(
        ctx.model, requests, batch_tokens=ctx.batch_tokens, bf16=ctx.bf16, max_len=window, stats=stats,
        progress=ctx.track(task.name, len(requests)),
    )
    nll = [0.0] * len(docs)
    for d, sc in zip(owner, scores, strict=True):
        nll[d] -= sc[0].logprob
    cols = {
        "nll": as_array(nll),
        "tokens": as_array([len(ids) for _, _, ids in docs]),
        "words": as_array([max(1, len(text.split())) for _, text, _ in docs]),
        "bytes": as_array([len(text.encode("utf-8")) for _, text, _ in docs]),
    }
    return TaskResult.of(task, cols, metrics(cols), [item_id(rec) for rec, _, _ in docs],
                         info={"documents": len(docs), "windows": len(requests), "tokens": int(cols["tokens"].sum())})
