"""What the prompt/answer kinds (generate, knowledge_qa, reference_likelihood) share: gold answers of a record,
the chat template, and few-shot examples written as text or as chat turns."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ...errors import DataError
from ..tasks import render


def gold_answers(answers: str | list[str], rec: Any, task: str) -> list[str]:
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


def prompt_of(task: Any, rec: Any) -> str:
    """The task's prompt template rendered for one record."""
    return str(render(task.prompt, rec, task.name, "prompt"))


def shots_text(task: Any, shots: list[Any], answer: Callable[[Any], str]) -> str:
    """Few-shot examples as plain text: `prompt + target_delimiter + answer + fewshot_delimiter` each."""
    return "".join(prompt_of(task, s) + task.target_delimiter + answer(s) + task.fewshot_delimiter for s in shots)


def shots_chat(task: Any, shots: list[Any], answer: Callable[[Any], str]) -> list[dict[str, str]]:
    """Few-shot examples as chat turns: the prompt as a user turn, the answer as the assistant's."""
    msgs: list[dict[str, str]] = []
    for s in shots:
        msgs += [{"role": "user", "content": prompt_of(task, s)}, {"role": "assistant", "content": answer(s)}]
    return msgs
