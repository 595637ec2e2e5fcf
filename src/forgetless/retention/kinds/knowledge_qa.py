"""knowledge_qa: closed-book question answering (Natural Questions open, TriviaQA no-context), scored by how
likely the model finds the gold answer, with greedy exact match on a subset as a secondary check.

Main metric (continuous): `alias_nll`, the mean over items of -max_a log p(a | prompt), the negative
log-likelihood in nats of the *best* gold alias a (the most likely one under the model), teacher-forced
after the prompt. Lower is better; the retention ratio is base / candidate. Each alias is scored as a
whole string (the sum of its tokens' log-probabilities, not per token), so the metric is the log of the
probability that the model's answer starts with some gold alias. All aliases of an item share one
context (tree attention in the engine), so scoring ten aliases costs little more than one.

Also reported from the same scores: `alias_ce` (nats per token of the best alias, token-weighted),
`p_alias` (the mean of max_a p(a | prompt)) and `alias_top1` (the share of items where the best alias's
tokens are all the greedy choice: the model would say it).

Secondary (generation, on a fixed-seed subset of `generate_limit` items): greedy answers, cut at the first
stop sequence, scored like lm-eval's triviaqa / nq_open: `exact_match` (SQuAD-normalised string equality
with any alias) and `contains` (some normalised alias occurs in the normalised answer). Items outside the
subset carry 0 in a `generated` column and the metrics divide by the number generated, so intervals and
paired tests resample the same items as the main metric. Small models score near 0 here; it is reported
anyway, as a check that the likelihood is about answering and not about style.

Prompt layout (plain text, which base and instruct models both continue): k shots as
`prompt + target_delimiter + first alias + fewshot_delimiter`, then the item's prompt; the alias follows
`target_delimiter`, pair-encoded as lm-eval does (trailing spaces move into the continuation). With
`chat: true` (or auto and a chat template) the prompt is a user turn and the alias starts the assistant's
answer. Aliases: the field's value(s), de-duplicated in order (TriviaQA: `value` first, then `aliases`),
at most `max_aliases` of them (TriviaQA has up to 230 variants per question; the first ten hold the
canonical forms).
"""

from __future__ import annotations

import random
import time
from typing import Any, Literal

import numpy as np
from pydantic import Field

from ...errors import DataError
from ..lm import EngineStats, Request, Score, greedy_generate, score_requests
from ..metrics import Columns, Metric, mean_of, per_unit
from ..tasks import TaskBase, TaskResult, as_array, item_id, pick_shots, rows_and_shot_pool
from .base import EvalContext, encode, encode_pair
from .generate.qa import qa_scores
from .prompting import chat_ids, gold_answers, prompt_of, shots_chat, shots_text, use_chat


class KnowledgeQATask(TaskBase):
    kind: Literal["knowledge_qa"] = "knowledge_qa"
    prompt: str = Field("Question: {{question}}\nAnswer:", description="Template of the question prompt.")
    answers: str | list[str] = Field(
        "answer",
        description="Field or template giving the gold aliases (a string, a list, or TriviaQA's {value, aliases})."
    )
    max_aliases: int | None = Field(10, gt=0,
                                    description="Score at most this many aliases per item (in order, de-duplicated).")
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    chat: bool | Literal["auto"] = Field(False, description="Put the prompt in the tokenizer's chat template (auto: "
                                                            "when it has one).")
    generate_limit: int = Field(100, ge=0,
                                description="Greedy generation (exact match, contains) on this many items; 0: none.")
    max_new_tokens: int = Field(24, gt=0)
    stop: list[str] = Field(default_factory=lambda: ["\n"])
    batch_size: int = Field(50, gt=0, description="Prompts generated at once.")
    main_metric: Literal["alias_nll", "alias_ce", "p_alias", "exact_match", "contains"] = "alias_nll"


def _share(num: str, den: str, name: str) -> Metric:
    """sum(num) / sum(den), higher is better (a rate over the generated subset)."""

    def fn(c: Columns) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            return c[num].sum(axis=-1) / c[den].sum(axis=-1)

    return Metric(name, True, fn)


def metrics(cols: Any = None, task: Any = None) -> list[Metric]:
    return [
        mean_of("nll", "alias_nll", higher_is_better=False),
        per_unit("nll", "tokens", "alias_ce"),
        mean_of("p", "p_alias"),
        mean_of("top1", "alias_top1"),
        _share("exact_match", "generated", "exact_match"),
        _share("contains", "generated", "contains"),
    ]


def aliases(task: KnowledgeQATask, rec: Any) -> list[str]:
    """The item's gold aliases, stripped, de-duplicated in order, at most `max_aliases`."""
    out: list[str] = []
    for a in gold_answers(task.answers, rec, task.name):
        a = a.strip()
        if a and a not in out:
            out.append(a)
    return out[: task.max_aliases] if task.max_aliases else out


def build_requests(task: KnowledgeQATask, ctx: EvalContext, rows: list[Any],
                   pool: list[Any]) -> tuple[list[Request], list[list[int]], list[list[str]]]:
    """Per item: one request (shared context, one continuation per alias), the generation prompt's ids, the aliases."""
    tok = ctx.tokenizer
    chat = use_chat(task.chat, tok, task.name)
    requests, prompts, golds = [], [], []
    for k, rec in enumerate(rows):
        shots = pick_shots(pool, task.shots, task.seed + k, exclude=rec)
        prompt = prompt_of(task, rec)
        al = aliases(task, rec)
        if not al:
            raise DataError(f"{rec.where}: task {task.name}: no gold answer")
        if chat:
            msgs = shots_chat(task, shots, lambda s: aliases(task, s)[0])
            context = chat_ids(tok, [*msgs, {"role": "user", "content": prompt}])
            conts = [encode(tok, a) for a in al]
            gen_prompt = context
        else:
            text = shots_text(task, shots, lambda s: aliases(task, s)[0]) + prompt
            pairs = [encode_pair(tok, text, task.target_delimiter + a) for a in al]
            context, conts = pairs[0][0], [p[1] for p in pairs]
            gen_prompt = encode(tok, text.rstrip(" "))
        for a, c in zip(al, conts, strict=True):
            if not c:
                raise DataError(f"{rec.where}: task {task.name}: the alias {a!r} encodes to no tokens")
        requests.append(Request(context, conts))
        prompts.append(gen_prompt)
        golds.append(al)
    return requests, prompts, golds


def generation_subset(task: KnowledgeQATask, n: int) -> list[int]:
    """The items generated for exact match: a fixed-seed sample of `generate_limit` of the n items (sorted)."""
    k = min(task.generate_limit, n)
    return sorted(random.Random(task.seed + 1).sample(range(n), k)) if k < n else list(range(n))


def _best_alias(scores: list[Score]) -> int:
    """The index of the best-scored alias (the first of equals)."""
    return max(range(len(scores)), key=lambda j: scores[j].logprob)


def run(task: KnowledgeQATask, ctx: EvalContext) -> TaskResult:
    rows, pool = rows_and_shot_pool(task, ctx.data_root)
    requests, prompts, golds = build_requests(task, ctx, rows, pool)
    stats = EngineStats()
    scores = score_requests(
        ctx.model, requests, batch_tokens=ctx.batch_tokens, bf16=ctx.bf16, max_len=ctx.window(), stats=stats,
        progress=ctx.track(task.name, len(requests)),
    )
    best = [_best_alias(sc) for sc in scores]
    nll = [-sc[b].logprob for sc, b in zip(scores, best, strict=True)]
    n = len(rows)
    subset = generation_subset(task, n)
    em, contains, generated = np.zeros(n), np.zeros(n), np.zeros(n)
    preds: dict[int, str] = {}
    t_gen = time.perf_counter()
    if subset:
        outs = greedy_generate(ctx.model, ctx.tokenizer, [prompts[i] for i in subset],
                               max_new_tokens=task.max_new_tokens,
                               stop=task.stop, batch_size=task.batch_size, bf16=ctx.bf16,
                               progress=ctx.track(f"{task.name} (generate)", len(subset)))
        for i, ids in zip(subset, outs, strict=True):
            pred = ctx.tokenizer.decode(ids, skip_special_tokens=True).strip()
            s = qa_scores(pred, golds[i])
            em[i], contains[i], generated[i] = s["exact_match"], s["contains"], 1.0
            preds[i] = pred
    generate_s = time.perf_counter() - t_gen
    cols = {
        "nll": as_array(nll),
        "tokens": as_array([sc[b].n_tokens for sc, b in zip(scores, best, strict=True)]),
        "p": np.exp(-as_array(nll)),
        "top1": as_array([float(sc[b].greedy) for sc, b in zip(scores, best, strict=True)]),
        "exact_match": em,
        "contains": contains,
        "generated": generated,
    }
    details: list[dict[str, Any]] = []
    for i, rec in enumerate(rows):
        details.append({
            "id": item_id(rec), "where": rec.where,
            "question": prompt_of(task, rec)[-300:],
            "gold": golds[i][:5], "best_alias": golds[i][best[i]], "alias_logprob": round(-nll[i], 4),
            "prediction": preds.get(i), "correct": bool(em[i]) if i in preds else None,
        })
    return TaskResult.of(task, cols, metrics(cols, task), [d["id"] for d in details], details,
                         {"left_truncated": stats.left_truncated, "tokens": stats.tokens,
                          "aliases": int(sum(len(g) for g in golds)), "generated": len(subset),
                          "generate_s": round(generate_s, 2)})
