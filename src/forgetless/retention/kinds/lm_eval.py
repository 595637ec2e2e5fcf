"""lm_eval: any lm-evaluation-harness task, run on the in-memory model (extra: forgetless[lmeval]).

Offline, point `include_path` at a folder of local lm-eval YAML tasks (`dataset_path: json` with
`data_files`). Per-sample metrics come back from lm-eval's logged samples, so intervals and paired tests
work as for the native kinds. `limit`, `sample`, `seed` and `exclude` pick the items as they do for the native
kinds (a fixed-seed sample of the task's evaluation documents, passed to lm-eval as its `samples`), not
lm-eval's own `limit` (the first documents).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import Field

from ...errors import ForgetlessError
from ..metrics import mean_of
from ..tasks import TaskBase, TaskResult, as_array, sample_indices
from .base import EvalContext


class LmEvalTask(TaskBase):
    kind: Literal["lm_eval"] = "lm_eval"
    task: str = Field(description="lm-eval task name.")
    include_path: str | None = Field(None, description="Folder of extra lm-eval task YAMLs (local tasks offline).")
    num_fewshot: int | None = None
    batch_size: int = 8
    main_metric: str = "acc"
    lower_is_better: list[str] = Field(default_factory=lambda: ["perplexity", "word_perplexity", "byte_perplexity",
                                                                "bits_per_byte"])


def metrics(cols, task: LmEvalTask) -> list:
    return [mean_of(m, higher_is_better=m not in task.lower_is_better) for m in cols]


def run(task: LmEvalTask, ctx: EvalContext) -> TaskResult:
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ForgetlessError("task kind lm_eval needs lm-evaluation-harness: pip install "
                              "'forgetless[lmeval]'") from None
    include = task.include_path
    if include and ctx.data_root and not include.startswith("/"):
        include = str(ctx.data_root / include)
    manager = TaskManager(include_path=include) if include else TaskManager()
    chosen = None
    if task.limit is not None or task.exclude is not None:  # the items, as the native kinds sample them
        if hasattr(manager, "load"):  # lm-eval >= 0.4.10: flat dicts of tasks and groups
            loaded = manager.load([task.task])["tasks"].get(task.task)
        else:
            loaded = manager.load_task_or_group([task.task]).get(task.task)
        if loaded is None or not hasattr(loaded, "eval_docs"):
            raise ForgetlessError(f"task {task.name}: lm-eval {task.task!r} is a group, not one task: limit and "
                                  "exclude sample one task's documents (name its tasks one by one)")
        chosen = {task.task: sample_indices(task, len(loaded.eval_docs))}
    lm = HFLM(pretrained=ctx.model, tokenizer=ctx.tokenizer, batch_size=task.batch_size)
    out = simple_evaluate(
        model=lm,
        tasks=[task.task],
        num_fewshot=task.num_fewshot if task.num_fewshot is not None else (task.shots or None),
        samples=chosen,
        log_samples=True,
        bootstrap_iters=0,
        task_manager=manager,
    )
    samples = out["samples"][task.task]
    if not samples:
        raise ForgetlessError(f"task {task.name}: lm-eval returned no samples for {task.task}")
    first = samples[0]
    metric_names = [m for m in first.get("metrics", []) if isinstance(first.get(m), (int, float, bool, np.floating))]
    if task.main_metric not in metric_names:
        raise ForgetlessError(f"task {task.name}: lm-eval task {task.task} has no per-sample metric "
                              f"{task.main_metric!r}; has {metric_names}")
    cols = {m: as_array([float(s[m]) for s in samples]) for m in metric_names}
    return TaskResult.of(task, cols, metrics(cols, task), [str(s["doc_id"]) for s in samples],
                         info={"lm_eval_results": {k: v for k, v in out["results"][task.task].items()
                                                   if isinstance(v, (int, float, str))}})
