"""Data a mitigation reads besides the task's: replay sets, EWC reference sets, self-generated answers."""

from __future__ import annotations

import random
from typing import Any

from ..config import DataConfig
from ..data import build_examples, load_records
from ..errors import DataError
from ..retention.kinds.base import EvalContext
from ..retention.kinds.self_reference import SelfReferenceTask, build_reference
from .base import TrainContext


def examples_from(cfg: DataConfig, ctx: TrainContext, what: str) -> list[dict]:
    """Tokenize a mitigation's own data set with the task's tokenizer (max_length: its own, else the task's)."""
    if "max_length" not in cfg.model_fields_set:
        cfg = cfg.model_copy(update={"max_length": ctx.recipe.data.max_length})
    records = load_records(cfg.train, cfg.split)
    if not records:
        raise DataError(f"{what}: the data set {cfg.train} is empty")
    if cfg.limit:
        records = records[: cfg.limit]
    examples, stats = build_examples(records, cfg, ctx.tokenizer)
    if not examples:
        raise DataError(f"{what}: no usable examples in {cfg.train} after tokenization")
    if lost := stats.losses():  # reported as the task data's are (never silent)
        from rich.console import Console

        Console(stderr=True).print(f"{what}: {', '.join(lost)} of {stats.records} records at max_length "
                                   f"{cfg.max_length} ({cfg.train})", style="yellow", highlight=False, markup=False)
    return examples


def self_reference_examples(ctx: TrainContext, n: int, seed: int = 0) -> list[dict]:
    """The base model's own greedy answers to the built-in general prompts, as training examples
    (prompt masked): what the model already does, for Fisher estimates."""
    task = SelfReferenceTask(name="reference", limit=n, seed=seed)
    ectx = EvalContext(model=ctx.model, tokenizer=ctx.tokenizer, bf16=ctx.bf16, cache_dir=ctx.cache_dir,
                       reference_fingerprint=ctx.fingerprint())
    ref = build_reference(task, ectx)
    return [{"input_ids": p + a, "labels": [-100] * len(p) + a}
            for p, a in zip(ref["prompts"], ref["answers"], strict=True)]


def sample(examples: list[dict], n: int, seed: int) -> list[dict]:
    """n examples drawn without replacement while possible, cycling through a shuffled order otherwise."""
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    return [examples[order[i % len(order)]] for i in range(n)]


def count_tokens(examples: list[dict[str, Any]]) -> int:
    return sum(len(e["input_ids"]) for e in examples)
