"""generate: greedy generation with stop sequences, scored against a list of aliases or a numeric answer.

Scorers: exact_match and contains (SQuAD-normalised: lower case, no punctuation or articles), token F1
(best over aliases), numeric (the final number of the prediction equals the gold number, GSM8K-style:
a gold "#### 42" is read as 42).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Literal

from pydantic import Field

from ...errors import DataError
from ..lm import greedy_generate
from ..metrics import mean_of
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


class GenerateTask(TaskBase):
    kind: Literal["generate"] = "generate"
    prompt: str = "Question: {{question}}\nAnswer:"
    answers: str = Field("answer", description="Field or template giving the gold answer(s): a string or a list of aliases.")
    answer_type: Literal["aliases", "numeric"] = "aliases"
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    fewshot_answer: str | None = Field(None, description="Template of the answer shown in few-shot examples (default: first alias).")
    chat: bool = Field(False, description="Wrap the prompt in the tokenizer's chat template.")
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(8, gt=0)
    main_metric: Literal["exact_match", "contains", "f1", "numeric"] | None = None


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
    value = render(task.answers, rec, task.name, "answers")
    if isinstance(value, dict):  # TriviaQA layout {"value": ..., "aliases": [...]}
        value = [value.get("value", "")] + list(value.get("aliases", []))
    golds = [str(v) for v in value] if isinstance(value, list) else [str(value)]
    golds = [g for g in golds if g.strip()]
    if not golds:
        raise DataError(f"{rec.where}: task {task.name}: no gold answer")
    return golds


def _prompt_ids(task: GenerateTask, ctx: EvalContext, text: str) -> list[int]:
    if task.chat:
        if not getattr(ctx.tokenizer, "chat_template", None):
            raise DataError(f"task {task.name}: chat: true but the tokenizer has no chat template")
        ids = ctx.tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        return list(ids)
    return encode(ctx.tokenizer, text)


def metrics(cols, task=None) -> list:
    return [mean_of(n) for n in cols]


def run(task: GenerateTask, ctx: EvalContext) -> TaskResult:
    all_rows = load_rows(task, ctx.data_root)
    rows = sample_rows(task, all_rows)
    pool = fewshot_pool(task, all_rows, rows) if task.shots else []
    prompts, golds = [], []
    for k, rec in enumerate(rows):
        shots = pick_shots(pool, task.shots, task.seed + k)
        prefix = "".join(
            str(render(task.prompt, s, task.name, "prompt")) + task.target_delimiter
            + (str(render(task.fewshot_answer, s, task.name, "fewshot_answer")) if task.fewshot_answer else _golds(task, s)[0])
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
    main = task.main_metric or ("numeric" if task.answer_type == "numeric" else "exact_match")
    for rec, out, gold in zip(rows, outs, golds, strict=True):
        pred = ctx.tokenizer.decode(out, skip_special_tokens=True).strip()
        s = score_prediction(pred, gold, task.answer_type)
        per_item.append(s)
        details.append({"id": item_id(rec), "where": rec.where, "gold": gold[0], "prediction": pred, "correct": bool(s[main])})
    names = list(per_item[0])
    cols = {n: as_array([s[n] for s in per_item]) for n in names}
    return TaskResult(
        task=task.name,
        kind=task.kind,
        columns=cols,
        metrics=metrics(cols),
        main=main,
        item_ids=[d["id"] for d in details],
        details=details,
        info={"left_truncated": truncated},
    )
