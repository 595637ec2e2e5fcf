"""data.self_distill: the model rewrites each training response in its own words before training (SDFT).

Self-distillation fine-tuning (Yang et al., ACL 2024, "Self-Distillation Bridges Distribution Gap in Language
Model Fine-Tuning"): fine-tuning on responses written in another model's style moves the model's own output
distribution, and that drift is much of what it forgets. Before training, the model to be tuned answers each
training prompt again, shown the reference answer (`template`: {prompt}, {answer}); a rewrite replaces the
reference only if it keeps the reference's content by the declared check (`accept`), otherwise the original is
kept. Chat records: every assistant turn that carries loss is rewritten, each given the conversation before it
(its last user message wrapped by the template). The rewrites are greedy and batched, generated from the model
as it is before training (PEFT adapters disabled), and cached by model weights + records + settings (resumable:
a killed run keeps the batches it finished). Cost and acceptance go into data_stats.json and summary.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import DataConfig, SelfDistillAccept
from ..fingerprint import fingerprint_model
from ..lock import DirLock
from ..progress import bar
from ..retention.lm import greedy_generate
from .examples import IGNORE, plain_prompt_ids, prompt_completion, to_messages, uses_chat_template
from .loading import Record

DEFAULT_ANSWER_PATTERN = r"####\s*(\S+)"


@dataclass
class Request:
    """One response to rewrite: the record, which answer in it (message index for chat), the prompt tokens."""

    record: int
    turn: int | None  # chat: index of the assistant message; else None (the completion / output)
    reference: str
    prompt_ids: list[int]  # the rewrite request (offline) / the teacher's prompt (on_policy)
    student_ids: list[int] | None = None  # the prompt as training renders it, up to where the response starts


# ---------------------------------------------------------------- acceptance


def _norm_answer(text: str) -> str:
    return text.strip().rstrip(".").replace(",", "").lower()


def rouge_l(pred: str, ref: str) -> float:
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(ref, pred)["rougeL"].fmeasure)


def judge(rewrite: str, reference: str, accept: SelfDistillAccept, truncated: bool) -> str | None:
    """Why a rewrite is rejected, or None when it replaces the reference."""
    if not rewrite.strip():
        return "empty"
    if truncated:
        return "truncated"
    if accept.kind == "rouge_l":
        return None if rouge_l(rewrite, reference) >= accept.min else "rouge_l"
    if accept.kind == "regex":
        return None if re.search(accept.pattern or "", rewrite) else "regex"
    pattern = re.compile(accept.pattern or DEFAULT_ANSWER_PATTERN)
    want = _answer(pattern.search(reference))
    if want is None:
        return "reference_without_answer"
    got = _answer(pattern.search(rewrite))
    return None if got is not None and _norm_answer(got) == _norm_answer(want) else "answer"


def _answer(m: re.Match[str] | None) -> str | None:
    """The answer a match captured: its first group that took part (a pattern may offer alternatives)."""
    return None if m is None else next((g for g in m.groups() if g is not None), None)


# ---------------------------------------------------------------- requests


def _chat_prompt(tokenizer: Any, msgs: list[dict[str, str]]) -> list[int]:
    ids = tokenizer.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    return list(ids["input_ids"] if isinstance(ids, dict) else ids)


def build_requests(records: list[Record], cfg: DataConfig, tokenizer: Any) -> list[Request]:
    """Every response to rewrite, with the prompt the model answers (chat template where training uses one)."""
    sd = cfg.self_distill
    assert sd is not None
    chat = uses_chat_template(cfg, tokenizer)
    out: list[Request] = []
    for i, rec in enumerate(records):
        if cfg.format == "chat":
            msgs = to_messages(rec, cfg)
            for j, m in enumerate(msgs):
                if m["role"] != "assistant":
                    continue
                context = msgs[:j]
                # the request is the user message the turn answers; after a tool result (or another assistant
                # turn) the conversation so far is the request, shown whole before the rewrite request
                user = context[-1]["content"] if context and context[-1]["role"] == "user" else CONVERSATION_ABOVE
                ask = {"role": "user", "content": sd.template.format(prompt=user, answer=m["content"])}
                head = context[:-1] if context and context[-1]["role"] == "user" else context
                out.append(Request(i, j, m["content"], _chat_prompt(tokenizer, [*head, ask]),
                                   _chat_prompt(tokenizer, context)))
            continue
        prompt, answer = prompt_completion(rec, cfg)
        text = sd.template.format(prompt=prompt, answer=answer)
        msgs = ([{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []) + [
            {"role": "user", "content": text}]
        ids = _chat_prompt(tokenizer, msgs) if chat else list(tokenizer(text, add_special_tokens=True)["input_ids"])
        # the student's prompt exactly as training renders the record (examples.encode_record)
        if chat:
            student = _chat_prompt(tokenizer, to_messages(rec, cfg)[:-1])
        else:
            plain, _ = prompt_completion(rec, cfg, alpaca_template=cfg.format == "instruction")
            student = plain_prompt_ids(tokenizer, plain)
        out.append(Request(i, None, answer, ids, student))
    return out


#: {prompt} for an assistant turn that follows a tool result, not a user message (its context is shown above).
CONVERSATION_ABOVE = "(the conversation above)"


def on_policy_examples(records: list[Record], cfg: DataConfig, tokenizer: Any) -> tuple[list[dict], dict[str, Any]]:
    """data.self_distill mode on_policy: one training example per response (chat: per assistant turn), holding the
    student's prompt (`input_ids`, no target token) and the teacher's (`teacher_ids`: the template with the
    reference answer). A prompt that leaves no room for a response within data.max_length is dropped and
    counted."""
    sd = cfg.self_distill
    assert sd is not None and sd.mode == "on_policy"
    examples: list[dict] = []
    dropped, first = 0, list[str]()
    for r in build_requests(records, cfg, tokenizer):
        student = list(r.student_ids or [])
        if len(student) >= cfg.max_length:
            dropped += 1
            if len(first) < 5:
                first.append(f"{records[r.record].where} ({len(student)} tokens)")
            continue
        examples.append({"input_ids": student, "labels": [IGNORE] * len(student), "teacher_ids": r.prompt_ids})
    stats = {"mode": "on_policy", "responses": len(examples) + dropped, "prompts": len(examples),
             "dropped_overlong_prompts": dropped, "first_dropped": first, "teacher": sd.teacher,
             "max_new_tokens": sd.max_new_tokens, "temperature": sd.temperature}
    return examples, stats


def _replace(rec: Record, cfg: DataConfig, turn: int | None, text: str) -> Record:
    data = json.loads(json.dumps(rec.data))
    if turn is not None:
        msgs = data[cfg.field("messages")]
        # to_messages may have put a system message first that the record does not hold
        offset = 1 if cfg.system_prompt and (not msgs or msgs[0].get(cfg.field("role")) != "system") else 0
        msgs[turn - offset][cfg.field("content")] = text
    else:
        data[cfg.field("output" if cfg.format == "instruction" else "completion")] = text
    return Record(data, rec.source, rec.line)


# ---------------------------------------------------------------- the transform


def cache_key(model_fp: str, requests: list[Request], cfg: DataConfig, bf16: bool) -> str:
    h = hashlib.sha256()
    sd = cfg.self_distill
    assert sd is not None
    h.update(json.dumps({"model": model_fp, "template": sd.template, "max_new_tokens": sd.max_new_tokens,
                         "bf16": bf16, "v": 1}).encode())
    for r in requests:
        h.update(json.dumps([r.prompt_ids, r.reference]).encode())
    return h.hexdigest()[:24]


def _read_cache(path: Path) -> dict[int, dict[str, Any]]:
    """The rows a cache file holds; a last line cut short by a kill is dropped from the file (generated again)."""
    done: dict[int, dict[str, Any]] = {}
    if not path.is_file():
        return done
    text = path.read_text()
    whole = text[: text.rfind("\n") + 1]
    if whole != text:
        with open(path, "r+") as f:
            f.truncate(len(whole.encode()))
    for line in whole.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        done[int(row["i"])] = row
    return done


def weights_tag(model: Any) -> str:
    """How the model's base weights are held, for the rewrite cache's key beside the base's fingerprint: '' for
    fp32 weights (the default load), else the 4-bit quantization and the floating dtypes (a QLoRA run's rewrites
    come from the quantized model, not the one a full or LoRA run loads)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    tags = []
    quant = getattr(getattr(base, "config", None), "quantization_config", None)
    if getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False):
        q = quant.to_dict() if quant is not None and hasattr(quant, "to_dict") else dict(quant or {})
        tags.append("quant:" + json.dumps({k: str(v) for k, v in sorted(q.items())}, sort_keys=True))
    dtypes = sorted({str(p.dtype) for p in base.parameters() if p.is_floating_point()})
    if dtypes != ["torch.float32"]:
        tags.append("weights:" + ",".join(dtypes))
    return "|".join(tags)


def _generate_missing(path: Path, requests: list[Request], model: Any, tokenizer: Any, sd: Any, bf16: bool,
                      quiet: bool) -> tuple[dict[int, dict[str, Any]], int, int]:
    """The cache's rows, the missing ones generated (greedy) and appended batch by batch; how many were generated
    and their tokens."""
    done = _read_cache(path)
    todo = [k for k in range(len(requests)) if k not in done]
    generated_tokens = 0
    if todo:
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        off = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
        was_training = model.training
        model.eval()
        prog = bar(TextColumn("[bold]self_distill[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), label="self_distill", transient=True, disable=quiet)
        try:
            with off, prog, open(path, "a") as f:
                tid = prog.add_task("rewriting responses", total=len(requests), completed=len(requests) - len(todo))
                for s in range(0, len(todo), sd.batch_size):
                    batch = todo[s : s + sd.batch_size]
                    outs = greedy_generate(model, tokenizer, [requests[k].prompt_ids for k in batch],
                                           max_new_tokens=sd.max_new_tokens, batch_size=sd.batch_size, bf16=bf16)
                    for k, ids in zip(batch, outs, strict=True):
                        row = {"i": k, "text": tokenizer.decode(ids, skip_special_tokens=True).strip(),
                               "tokens": len(ids), "truncated": len(ids) >= sd.max_new_tokens}
                        done[k] = row
                        generated_tokens += len(ids)
                        f.write(json.dumps(row, ensure_ascii=False) + "\n")
                    f.flush()  # a killed run keeps every finished batch
                    prog.advance(tid, len(batch))
        finally:
            model.train(was_training)
    return done, len(todo), generated_tokens


def self_distill(records: list[Record], cfg: DataConfig, model: Any, tokenizer: Any, cache_dir: Path, bf16: bool,
                 quiet: bool = False, model_key: str | None = None) -> tuple[list[Record], dict[str, Any]]:
    """The training records with accepted rewrites in place of their references, and the transform's statistics.

    `model_key`: what identifies the model the rewrites come from in the cache key (the run passes its base
    model's fingerprint: the rewrites do not depend on a fresh adapter's random weights, so every seed, rank and
    method of a sweep shares them); default a hash of all of `model`'s weights."""
    sd = cfg.self_distill
    assert sd is not None
    t0 = time.perf_counter()
    requests = build_requests(records, cfg, tokenizer)
    key = cache_key(model_key or fingerprint_model(model), requests, cfg, bf16)
    path = cache_dir / "self_distill" / f"{key}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    # one writer per cache entry: a second process (a parallel sweep or bench shard with the same model and data)
    # waits, then reads what the first wrote instead of appending the same rows beside it
    with DirLock(path, "self_distill cache entry", wait=True, quiet=quiet):
        done, generated, generated_tokens = _generate_missing(path, requests, model, tokenizer, sd, bf16, quiet)
    reasons: dict[str, int] = {}
    accepted: dict[tuple[int, int | None], str] = {}
    for k, req in enumerate(requests):
        row = done[k]
        why = judge(row["text"], req.reference, sd.accept, bool(row.get("truncated")))
        if why is None:
            accepted[(req.record, req.turn)] = row["text"]
        else:
            reasons[why] = reasons.get(why, 0) + 1
    out = list(records)
    for (i, turn), text in accepted.items():
        out[i] = _replace(out[i], cfg, turn, text)
    stats = {"responses": len(requests), "accepted": len(accepted), "kept_original": len(requests) - len(accepted),
             "acceptance_rate": round(len(accepted) / len(requests), 4) if requests else None,
             "rejected": dict(sorted(reasons.items())), "accept": sd.accept.model_dump(),
             "generated": generated, "from_cache": len(requests) - generated, "generated_tokens": generated_tokens,
             "seconds": round(time.perf_counter() - t0, 2), "cache": str(path)}
    return out, stats
