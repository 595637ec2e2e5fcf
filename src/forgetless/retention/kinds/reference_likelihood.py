"""reference_likelihood: how likely the model finds a reference answer after its prompt (teacher forcing).

For any prompt/reference task (summarization, translation, QA with a written answer): the candidate's
per-token cross-entropy of the reference given the prompt, zero- or k-shot, optionally in the tokenizer's
chat template. No generation, so it is cheap and continuous: a sensitive retention signal for skills that
are otherwise scored on generated text (ROUGE, chrF).

Metrics: `ce` (nats per reference token, summed over items then divided: token-weighted) and
`bits_per_byte` of the reference (comparable across tokenizers). Lower is better for both.

Prompt layout. Plain: shots as `prompt + target_delimiter + reference + fewshot_delimiter`, then the prompt;
the reference follows `target_delimiter` (pair-encoded as lm-eval does). Chat: each shot is a user turn
(prompt) and an assistant turn (reference), then the item's prompt as a user turn and the generation prompt;
the reference is the start of the assistant's answer (the end-of-turn token is not scored).
With several references per item (a list), the first is scored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ...errors import DataError
from ..lm import EngineStats, Request, score_requests
from ..metrics import LN2, Metric, per_unit
from ..tasks import TaskBase, TaskResult, as_array, item_id, pick_shots, rows_and_shot_pool
from .base import EvalContext, encode, encode_pair
from .prompting import chat_ids, gold_answers, prompt_of, shots_chat, shots_text, use_chat


class ReferenceLikelihoodTask(TaskBase):
    kind: Literal["reference_likelihood"] = "reference_likelihood"
    prompt: str = Field("{{prompt}}", description="Template of the prompt (the context the reference follows).")
    reference: str | list[str] = Field(
        "reference",
        description="Field or template of the reference (a list: the first is scored); or a list of fields."
    )
    target_delimiter: str = " "
    fewshot_delimiter: str = "\n\n"
    chat: bool | Literal["auto"] = Field(
        False, description="Put the prompt in the tokenizer's chat template (auto: when the tokenizer has one)."
    )
    max_reference_tokens: int | None = Field(None, gt=0,
                                             description="Score at most this many reference tokens (its start).")
    main_metric: Literal["ce", "bits_per_byte"] = "ce"


def metrics(cols: Any, task: Any = None) -> list[Metric]:
    return [per_unit("nll", "tokens", "ce"), per_unit("nll", "bytes", "bits_per_byte", 1 / LN2)]


def _reference(task: ReferenceLikelihoodTask, rec: Any) -> str:
    return gold_answers(task.reference, rec, task.name)[0]


def build_requests(task: ReferenceLikelihoodTask, ctx: EvalContext, rows: list[Any],
                   pool: list[Any]) -> tuple[list[Request], list[str]]:
    """One request per item (context ids, [reference ids]) and the scored reference texts."""
    tok = ctx.tokenizer
    chat = use_chat(task.chat, tok, task.name)
    requests, texts = [], []
    for k, rec in enumerate(rows):
        shots = pick_shots(pool, task.shots, task.seed + k, exclude=rec)
        prompt = prompt_of(task, rec)
        ref = _reference(task, rec)
        if chat:
            msgs = shots_chat(task, shots, lambda s: _reference(task, s))
            context = chat_ids(tok, [*msgs, {"role": "user", "content": prompt}])
            cont = encode(tok, ref)
        else:
            prefix = shots_text(task, shots, lambda s: _reference(task, s))
            context, cont = encode_pair(tok, prefix + prompt, task.target_delimiter + ref)
        cut = bool(task.max_reference_tokens and len(cont) > task.max_reference_tokens)
        if cut:
            cont = cont[: task.max_reference_tokens]
        if not cont:
            raise DataError(f"{rec.where}: task {task.name}: the reference encodes to no tokens")
        requests.append(Request(context, [cont]))
        texts.append(tok.decode(cont).strip() if cut else ref)  # what was scored, for bits per byte
    return requests, texts


def run(task: ReferenceLikelihoodTask, ctx: EvalContext) -> TaskResult:
    rows, pool = rows_and_shot_pool(task, ctx.data_root)
    requests, texts = build_requests(task, ctx, rows, pool)
    stats = EngineStats()
    scores = score_requests(
        ctx.model, requests, batch_tokens=ctx.batch_tokens, bf16=ctx.bf16, max_len=ctx.window(), stats=stats,
        progress=ctx.track(task.name, len(requests)),
    )
    nll = [-s[0].logprob for s in scores]
    cols = {
        "nll": as_array(nll),
        "tokens": as_array([s[0].n_tokens for s in scores]),
        "bytes": as_array([max(1, len(t.encode("utf-8"))) for t in texts]),
    }
    details: list[dict[str, Any]] = [
        {"id": item_id(rec), "where": rec.where, "reference": t[:300], "ce": round(n / max(1, s[0].n_tokens), 4)}
        for rec, t, n, s in zip(rows, texts, nll, scores, strict=True)
    ]
    return TaskResult.of(task, cols, metrics(cols, task), [d["id"] for d in details], details,
                         {"left_truncated": stats.left_truncated, "reference_tokens": int(cols["tokens"].sum()),
                          "tokens": stats.tokens})
