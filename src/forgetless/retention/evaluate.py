"""Run a suite on a model, compare with a baseline, and say what was forgotten (with noise accounted for).

The baseline's results are cached by model fingerprint + suite fingerprint, so the base model is
evaluated once however many candidates are compared with it.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..fingerprint import fingerprint_model
from ..io import atomic_write_json
from ..lock import DirLock
from ..precision import resolve as resolve_precision
from ..progress import bar
from . import metrics as M
from .kinds import (
    generate,
    knowledge_qa,
    lm_eval,
    multiple_choice,
    perplexity,
    reference_likelihood,
    self_reference,
)
from .kinds.base import EvalContext
from .suite import Suite
from .tasks import MissingDataError, TaskResult, resolve_data_root

KINDS = {
    "multiple_choice": multiple_choice,
    "perplexity": perplexity,
    "generate": generate,
    "self_reference": self_reference,
    "lm_eval": lm_eval,
    "reference_likelihood": reference_likelihood,
    "knowledge_qa": knowledge_qa,
}
ENGINE_VERSION = "3"  # bump when scoring changes, to invalidate cached baselines (2: MC shots never the item
# itself; sliding-window models off the shared-context path; 3: lm_eval tasks sample their items as native kinds)


def result_from_cache(d: dict[str, Any], task: Any) -> TaskResult:
    cols = {k: np.asarray(v, dtype=np.float64) for k, v in d["columns"].items()}
    metrics = KINDS[d["kind"]].metrics(cols, task)
    return TaskResult(d["task"], d["kind"], cols, metrics, d["main"], d["item_ids"], d["details"], d["info"],
                      ability=getattr(task, "ability", None), weight=getattr(task, "weight", 1.0))


def save_items(path: Path, res: SuiteResult, base: SuiteResult | None = None) -> None:
    """A suite result with its per-item columns (what a paired resampling needs), and the baseline's when given
    (under `base`): `forgetless eval --out X.json` writes X.items.json, the score matrix of a continual run and the
    frontier bench's verdict over seeds read them."""
    def tasks(r: SuiteResult) -> dict[str, Any]:
        return {n: t.to_cache() for n, t in r.tasks.items()}

    atomic_write_json(path, {"suite": res.suite, "model": res.model, "seconds": res.seconds, "tasks": tasks(res),
                             "base": {"model": base.model, "tasks": tasks(base)} if base is not None else None})


def load_items(path: Path, suite: Suite) -> dict[str, TaskResult]:
    """The candidate's per-task results save_items wrote."""
    from ..errors import ForgetlessError

    d = json.loads(path.read_text())
    by_name = {t.name: t for t in suite.tasks}
    missing = set(by_name) - set(d["tasks"])
    if missing:
        raise ForgetlessError(f"{path}: no scores for task(s) {', '.join(sorted(missing))}; run again with --overwrite")
    return {n: result_from_cache(d["tasks"][n], by_name[n]) for n in by_name}


def cache_root() -> Path:
    from ..models.catalog import cache_dir

    return cache_dir().parent / "eval_cache"


# ---------------------------------------------------------------- evaluation


@dataclass
class SuiteResult:
    suite: str
    tasks: dict[str, TaskResult]
    seconds: dict[str, float] = field(default_factory=dict)
    model: str | None = None

    def summary(self) -> dict[str, Any]:
        out = {}
        for name, r in self.tasks.items():
            out[name] = {
                "kind": r.kind,
                "ability": r.ability,
                "n": r.n,
                "main": r.main,
                "metrics": {m.name: M.value(m, r.columns) for m in r.metrics},
                "ci": {m.name: M.bootstrap_ci(m, r.columns) for m in r.metrics},
                "higher_is_better": {m.name: m.higher_is_better for m in r.metrics},
                "seconds": round(self.seconds.get(name, 0.0), 2),
                "info": r.info,
            }
        return out


def evaluate(
    model: nn.Module,
    tokenizer: Any,
    suite: Suite,
    *,
    data_root: str | Path | None = None,
    bf16: bool | None = None,
    batch_tokens: int = 4096,
    max_length: int | None = None,
    reference: Callable[[], tuple[nn.Module, Any]] | None = None,
    reference_fingerprint: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = True,
    model_name: str | None = None,
) -> SuiteResult:
    """Score `model` on every task of `suite`. `reference` loads the base model for self-reference tasks
    (default: the model itself). bf16: None picks by measurement (precision.resolve: bf16 autocast where it
    is faster on this device, about 2x on CPUs with native bf16); bf16 flips near-tied multiple-choice items
    (within 0.6 points of lm-eval at 500 items, bench/results/eval_speed.md), while fp32 (bf16=False)
    reproduces lm-eval exactly."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    torch.set_flush_denormal(True)
    root = resolve_data_root(data_root)
    model.eval()
    if bf16 is None:
        bf16 = resolve_precision("auto", next(model.parameters()).device, model=model).bf16
    prog = bar(TextColumn("[bold]eval[/bold] {task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeElapsedColumn(), label="eval", transient=True, disable=not progress)
    ctx = EvalContext(
        model=model, tokenizer=tokenizer, data_root=root, batch_tokens=batch_tokens, bf16=bf16, max_length=max_length,
        reference=reference,
        # hashing the weights takes ~1 s for a 135M model: only self-reference tasks need it (their cache key)
        reference_fingerprint=reference_fingerprint
        or (fingerprint_model(model) if any(t.kind == "self_reference" for t in suite.tasks) else None),
        cache_dir=cache_dir or cache_root(), progress=prog,
    )
    results, seconds = {}, {}
    with prog:
        for task in suite.tasks:
            t0 = time.perf_counter()
            try:
                results[task.name] = KINDS[task.kind].run(task, ctx)
            except MissingDataError as e:  # name the suite in the pull command
                raise MissingDataError(str(e).replace("forgetless data pull SUITE",
                                                      f"forgetless data pull {suite.name}")) from None
            results[task.name].ability, results[task.name].weight = task.ability, task.weight
            seconds[task.name] = time.perf_counter() - t0
            results[task.name].info["seconds"] = round(seconds[task.name], 2)
    return SuiteResult(suite.name, results, seconds, model_name)


def evaluate_cached(
    key_parts: dict[str, Any], suite: Suite, run: Callable[[], SuiteResult], cache_dir: Path | None = None,
    refresh: bool = False
) -> tuple[SuiteResult, bool]:
    """`run()` once per (model fingerprint, suite fingerprint, settings); later calls read the cache."""
    key = hashlib.sha256(
        json.dumps({**key_parts, "engine": ENGINE_VERSION, "score": M.SCORE_VERSION}, sort_keys=True).encode()
    ).hexdigest()[:24]
    path = (cache_dir or cache_root()) / "baselines" / f"{key}.json"

    def cached() -> tuple[SuiteResult, bool]:
        d = json.loads(path.read_text())
        by_name = {t.name: t for t in suite.tasks}
        tasks = {n: result_from_cache(r, by_name[n]) for n, r in d["tasks"].items()}
        return SuiteResult(d["suite"], tasks, d.get("seconds", {}), d.get("model")), True

    if path.is_file() and not refresh:
        return cached()
    # One writer per entry: a process that finds another evaluating the same baseline waits for it, then reads
    # its result (the runs of a sweep or a continual sequence share baselines).
    with DirLock(path, "evaluation cache entry", wait=True):
        if path.is_file() and not refresh:
            return cached()
        res = run()
        atomic_write_json(path, {"suite": res.suite, "model": res.model, "seconds": res.seconds, "key": key_parts,
                                 "tasks": {n: r.to_cache() for n, r in res.tasks.items()}})
    return res, False


# ---------------------------------------------------------------- comparison


def compare(
    base: SuiteResult, cand: SuiteResult, weights: dict[str, float] | None = None, max_flips: int = 20,
    abilities: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """Per task: every metric's change with a paired interval and significance; the retention score
    (definition `metrics.SCORE_VERSION`: by ability) with each ability's change and interval, each task's share
    of the score's variance, and the definition-1 score (task-weighted mean) for comparison with old results.
    `abilities` overrides the tasks' own tags (default: each result's `ability`), `weights` their weights
    (default: each result's `weight`, the suite's)."""
    tasks: dict[str, Any] = {}
    retention_inputs = []
    ability_inputs = []
    for name, c in cand.tasks.items():
        b = base.tasks.get(name)
        if b is None:
            continue
        if b.item_ids != c.item_ids:
            raise ValueError(f"task {name}: base and candidate were scored on different items; re-run both")
        comps = {m.name: M.paired_test(m, b.columns, c.columns) for m in c.metrics}
        main = c.main_metric
        flips = []
        if b.details and c.details and "correct" in b.details[0]:
            for bd, cd in zip(b.details, c.details, strict=True):
                if bd["correct"] and not cd["correct"]:
                    flips.append({**cd, "base_prediction": bd["prediction"]})
        main_cmp = comps[main.name]
        ability = (abilities or {}).get(name, c.ability)
        tasks[name] = {
            "kind": c.kind,
            "ability": ability,
            "n": c.n,
            "main": main.name,
            "higher_is_better": main.higher_is_better,
            "base": main_cmp.base,
            "candidate": main_cmp.candidate,
            "delta": main_cmp.delta,
            "ci": main_cmp.ci,
            "relative": main_cmp.relative,
            "p_value": main_cmp.p_value,
            "significant": main_cmp.significant,
            "significant_drop": main_cmp.significant_drop,
            "retention": M.retention_ratio(main, main_cmp.base, main_cmp.candidate),
            "metrics": {k: v.__dict__ for k, v in comps.items()},
            "flipped": len(flips),
            "flipped_examples": flips[:max_flips],
        }
        w = (weights or {}).get(name, c.weight)
        retention_inputs.append((main, b.columns, c.columns, w))
        ability_inputs.append((name, main, b.columns, c.columns, w, ability))
    nan2 = (float("nan"), float("nan"))
    v1, v1_ci = M.retention_score(retention_inputs) if retention_inputs else (float("nan"), nan2)
    by_ability: dict[str, Any] = M.ability_score(ability_inputs) if ability_inputs else {
        "score": float("nan"), "ci": nan2, "abilities": {}, "tasks": {}}
    for name, t in by_ability["tasks"].items():
        tasks[name].update({k: t[k] for k in ("weight_in_score", "variance_share", "half_width")})
    score, ci = by_ability["score"], by_ability["ci"]
    return {
        "score_definition": M.SCORE_VERSION,
        "tasks": tasks,
        "retention_score": score,
        "retention_ci": ci,
        "retention_drop": 1 - score,
        "abilities": by_ability["abilities"],
        "retention_score_v1": v1,
        "retention_ci_v1": v1_ci,
        "significant_drops": [n for n, t in tasks.items() if t["significant_drop"]],
    }
