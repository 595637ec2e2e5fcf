"""multiple_choice: log-likelihood of each choice after the context (lm-eval's `multiple_choice`).

Metrics per item: acc (argmax of the summed log-likelihood), acc_norm (argmax of log-likelihood per
character of the choice, as lm-eval), and pgold: the probability of the gold choice after a softmax over
the choices' log-likelihoods, a continuous score with about half the paired noise of accuracy.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from ...errors import DataError
from ..lm import EngineStats, Request, score_requests
from ..metrics import mean_of
from ..tasks import (
    TEMPLATE_ENV,
    TaskBase,
    TaskResult,
    as_array,
    item_id,
    pick_shots,
    render,
    rows_and_shot_pool,
)
from .base import EvalContext, encode_pair


class MultipleChoiceTask(TaskBase):
    kind: Literal["multiple_choice"] = "multiple_choice"
    prompt: str = "{{question}}"
    choices: str | list[str] = "choices"
    gold: str = "gold"
    choice_template: str | None = None  # applied to each choice, as {{ choice }}
    gold_offset: int = 0
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    main_metric: Literal["acc", "acc_norm", "pgold"] = "acc_norm"


def _gold_index(raw, choices: list[str], where: str, task: str, offset: int) -> int:
    value = raw.strip() if isinstance(raw, str) else raw
    if isinstance(value, str):
        if value.lstrip("-").isdigit():
            value = int(value)
        elif len(value) == 1 and value.isalpha():
            value = ord(value.upper()) - ord("A")
        elif value in choices:
            value = choices.index(value)
        else:
            raise DataError(f"{where}: task {task}: gold {raw!r} is neither an index, a letter nor one of the choices")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise DataError(f"{where}: task {task}: gold {raw!r} is not an index")
    value = int(value) - offset
    if not 0 <= value < len(choices):
        raise DataError(f"{where}: task {task}: gold index {value} out of range for {len(choices)} choices")
    return value


def _choices(task: MultipleChoiceTask, rec) -> list[str]:
    if isinstance(task.choices, list):
        out = [str(render(t, rec, task.name, "choices")) for t in task.choices]
    else:
        value = render(task.choices, rec, task.name, "choices")
        if isinstance(value, dict) and "text" in value:  # HF ARC layout {"text": [...], "label": [...]}
            value = value["text"]
        if not isinstance(value, list) or not value:
            raise DataError(f"{rec.where}: task {task.name}: choices must be a non-empty list, got "
                            f"{type(value).__name__}")
        out = [str(v) for v in value]
    if task.choice_template:
        tmpl = TEMPLATE_ENV.from_string(task.choice_template)
        out = [tmpl.render({**rec.data, "choice": c}) for c in out]
    return out


def build_items(task: MultipleChoiceTask, rows) -> list[dict]:
    items = []
    for rec in rows:
        choices = _choices(task, rec)
        gold = _gold_index(render(task.gold, rec, task.name, "gold"), choices, rec.where, task.name, task.gold_offset)
        items.append({"rec": rec, "context": str(render(task.prompt, rec, task.name, "prompt")), "choices": choices,
                      "gold": gold})
    return items


def metrics(cols, task=None) -> list:
    return [mean_of("acc"), mean_of("acc_norm"), mean_of("pgold")]


def run(task: MultipleChoiceTask, ctx: EvalContext) -> TaskResult:
    rows, pool_rows = rows_and_shot_pool(task, ctx.data_root)
    items = build_items(task, rows)
    if not items:
        raise DataError(f"task {task.name}: no items to evaluate")
    pool = build_items(task, pool_rows) if task.shots else []
    requests = []
    for k, it in enumerate(items):
        # never the item itself (the pool is every row when every row is scored; its items are built apart)
        own = next((s for s in pool if s["rec"] is it["rec"]), None)
        shots = pick_shots(pool, task.shots, task.seed + k, exclude=own)
        prefix = "".join(
            s["context"] + task.target_delimiter + s["choices"][s["gold"]] + task.fewshot_delimiter for s in shots
        )
        context = prefix + it["context"]
        pairs = [encode_pair(ctx.tokenizer, context, task.target_delimiter + c) for c in it["choices"]]
        requests.append(Request(pairs[0][0], [p[1] for p in pairs]))
    stats = EngineStats()
    scores = score_requests(
        ctx.model, requests, batch_tokens=ctx.batch_tokens, bf16=ctx.bf16, max_len=ctx.window(), stats=stats,
        progress=ctx.track(task.name, len(requests)),
    )
    acc, acc_norm, pgold, details = [], [], [], []
    for it, sc in zip(items, scores, strict=True):
        ll = np.array([s.logprob for s in sc])
        lens = np.array([max(1, len(c)) for c in it["choices"]], dtype=float)
        pred, pred_norm = int(ll.argmax()), int((ll / lens).argmax())
        probs = np.exp(ll - ll.max())
        probs /= probs.sum()
        acc.append(float(pred == it["gold"]))
        acc_norm.append(float(pred_norm == it["gold"]))
        pgold.append(float(probs[it["gold"]]))
        details.append({
            "id": item_id(it["rec"]),
            "where": it["rec"].where,
            "context": it["context"][-300:],
            "gold": it["choices"][it["gold"]],
            "prediction": it["choices"][pred_norm if task.main_metric == "acc_norm" else pred],
            "correct": bool((pred_norm if task.main_metric == "acc_norm" else pred) == it["gold"]),
        })
    cols = {"acc": as_array(acc), "acc_norm": as_array(acc_norm), "pgold": as_array(pgold)}
    return TaskResult.of(task, cols, metrics(cols), [d["id"] for d in details], details,
                         {"left_truncated": stats.left_truncated, "tokens": stats.tokens})
