"""What is scored after every step: each task's held-out evaluation (per item, for the matrix) and the retention
suite (against the base model)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import ForgetlessError
from ..fingerprint import fingerprint_path
from ..io import atomic_write_json
from ..precision import device_keyed
from ..results import RetentionChange
from ..retention.api import eval_device, eval_model, eval_precision, load_for_eval
from ..retention.evaluate import compare, evaluate, evaluate_cached, save_items
from ..retention.suite import Suite, load_suite
from ..retention.tasks import resolve_data_root
from ..sweep import auto_task_suite
from ..train.model import load_model
from .plan import Step, resolve_path
from .sequence import ContinualConfig


def task_suite(cfg: ContinualConfig, steps: list[Step], folder: Path) -> Any:
    """One suite with every task's evaluation, each renamed after its sequence task."""
    tasks = []
    for k, step in enumerate(steps):
        where = f"tasks[{k}] ({step.task.name}).eval"
        if step.task.eval == "auto":
            d = step.recipe.data
            if not d.validation or not isinstance(d.validation, str) or d.validation.startswith("hf:"):
                raise ForgetlessError(f"{where}: auto scores the held-out answers of a local data.validation file; "
                                      "add one to the task's data: or name an eval suite")
            if d.format not in ("chat", "prompt_completion"):
                raise ForgetlessError(f"{where}: auto handles chat and prompt_completion data (data.format is "
                                      f"{d.format}); name an eval suite")
            t = auto_task_suite(step.recipe).tasks[0]
        else:
            s = load_suite(resolve_path(step.task.eval, folder))
            t = s.only([step.task.eval_task]).tasks[0] if step.task.eval_task else s.tasks[0]
        tasks.append(t.model_copy(update={"name": step.task.name}))
    suite = Suite(name=f"{cfg.name}-tasks", description="each task's held-out evaluation", tasks=tasks)
    return suite.with_limit(cfg.limit)


class Evaluator:
    """Scores models on the task suite (per-item results kept) and on the retention suite (eval_model)."""

    def __init__(self, cfg: ContinualConfig, suite: Any, retention: Any, base_path: str, quiet: bool,
                 device: str = "cpu"):
        self.cfg, self.suite, self.retention, self.base_path, self.quiet = cfg, suite, retention, base_path, quiet
        self.base_fp = fingerprint_path(base_path)
        self._base: Any = None
        # scored where the steps train (`train.device`: auto is the GPU when there is one), at one precision
        # resolved once for that device: every step and the base alike (the cache keys on both)
        self.device = eval_device(device)
        self.precision = eval_precision(cfg.eval_setting(), base_path, self.device)
        self.bf16 = self.precision.bf16

    def load_base(self) -> Any:
        if self._base is None:
            m, t = load_model(self.base_path, device=str(self.device))
            self._base = (m.eval(), t)
        return self._base

    def _run(self, model_dir: str) -> Any:
        model, tok, path = load_for_eval(model_dir, device=self.device)
        return evaluate(model, tok, self.suite, data_root=self.cfg.data_root, bf16=self.bf16, reference=self.load_base,
                        reference_fingerprint=self.base_fp, progress=not self.quiet, model_name=path)

    def base_row(self, out: Path) -> Any:
        key = device_keyed({"model": self.base_fp, "bf16": self.bf16, "max_length": None,
                            "suite": self.suite.fingerprint(resolve_data_root(self.cfg.data_root))}, self.device)
        res, _ = evaluate_cached(key, self.suite, lambda: self._run(self.base_path))
        save_items(out / "base" / "eval-task.items.json", res)
        return res

    def step(self, step: Step, base_res: Any) -> tuple[Any, dict[str, Any] | None]:
        """Task scores (SuiteResult) and the retention report of one step's model; both written to its directory."""
        res = self._run(str(step.dir))
        save_items(step.dir / "eval-task.items.json", res)
        atomic_write_json(step.dir / "eval-task.json", {
            "model": str(step.model_dir), "baseline": self.base_path, "suite": self.suite.name,
            "settings": {"bf16": self.bf16, "precision": self.precision.dtype,
                         "precision_reason": self.precision.reason, "limit": self.cfg.limit},
            "candidate": res.summary(), "base": base_res.summary(),
            "comparison": compare(base_res, res, {t.name: t.weight for t in self.suite.tasks}),
        })
        ret = None
        if self.retention is not None:
            ret = eval_model(str(step.dir), self.retention, baseline=self.base_path, limit=self.cfg.limit,
                             data_root=self.cfg.data_root, precision=self.precision.dtype,
                             out=step.dir / "eval-retention.json", progress=not self.quiet,
                             device=self.precision.device)  # where the sequence's task scores are computed
        return res, ret


def retention_entry(report: dict[str, Any] | None) -> dict[str, Any] | None:
    """A step's retention change as continual.json keeps it (None without a comparison)."""
    if not report or not report.get("comparison"):
        return None
    return RetentionChange.of(report["comparison"]).as_dict(
        "score", "change", "ci", "significant_drops", "tasks",
        task_fields=("main", "base", "candidate", "delta", "ci", "significant_drop"))
