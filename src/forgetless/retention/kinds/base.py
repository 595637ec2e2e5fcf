"""What every task kind receives: the model under test, its tokenizer, and evaluation settings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class EvalContext:
    model: nn.Module
    tokenizer: Any
    data_root: Path | None = None
    batch_tokens: int = 4096
    bf16: bool = True
    max_length: int | None = None  # cap on the window (default: the model's context, at most 2048)
    reference: Callable[[], tuple[nn.Module, Any]] | None = None  # loads the base model (self-reference)
    reference_fingerprint: str | None = None
    cache_dir: Path | None = None
    progress: Any = None  # rich Progress or None
    extras: dict[str, Any] = field(default_factory=dict)

    def window(self) -> int:
        from ..lm import context_window

        w = context_window(self.model)
        return min(w, self.max_length or 2048)

    def track(self, description: str, total: int):
        """A progress callback advancing a rich task by n; no-op without a Progress."""
        if self.progress is None:
            return lambda n: None
        tid = self.progress.add_task(description, total=total)
        return lambda n: self.progress.advance(tid, n)


def encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids without special tokens (lm-eval's convention for causal models)."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prefix_token(tokenizer: Any) -> int:
    """What an empty context starts from: BOS where the tokenizer has one, else EOS (as lm-eval)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def encode_pair(tokenizer: Any, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-eval's pair encoding: trailing spaces move to the continuation, the context keeps the tokenizer's
    special tokens (BOS), and the continuation's tokens are those of context+continuation after the
    context's tokens."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    if not context:
        return [prefix_token(tokenizer)], encode(tokenizer, continuation)
    # the tokenizer's own special tokens (a BOS for Llama/Gemma/Mistral tokenizers), as lm-eval keeps them
    whole = list(tokenizer(context + continuation)["input_ids"])
    ctx = list(tokenizer(context)["input_ids"])
    if tokenizer.eos_token_id is not None and ctx and ctx[-1] == tokenizer.eos_token_id and whole[-1] == ctx[-1]:
        ctx, whole = ctx[:-1], whole[:-1]  # tokenizers that append EOS: not part of the scored text
    return ctx, whole[len(ctx) :]
