"""`forgetless continual`: fine-tune on a sequence of tasks, one after another, and measure what each step
cost every earlier task and the base model's abilities.

A sequence file is a base recipe plus an ordered list of tasks:

    name: support-abc
    base: recipe.yaml              # a recipe file (relative to this file) or an inline mapping
    tasks:
      - name: product-a
        data: {train: a_train.jsonl, validation: a_val.jsonl}     # over the base recipe's data: options
      - name: product-b
        data: {train: b_train.jsonl, validation: b_val.jsonl}
        set: {optim.lr: 1.0e-4}    # per-step recipe overrides (dotted keys, as with --set)
        eval: auto                 # auto: reference likelihood of data.validation; or a suite (file or built-in)
    retention_suite: self          # the base abilities, evaluated after every step (null: none)
    limit: 200                     # items per evaluation task
    carry:                         # mitigations handed from step to step: ordinary mitigation configs
      - {name: ewc, weight: 1000, samples: 200, gamma: 1.0}   # online EWC: each finished task's Fisher, accumulated
      - {name: si, weight: 1.0}                               # Synaptic Intelligence importance, accumulated
      - {name: replay, ratio: 0.2, buffer: {policy: quota, per_task: 50}}   # earlier tasks' kept examples
      - {name: kl, weight: 1.0}                               # KL to the previous step's model
      - {name: olora, weight: 0.5}                            # LoRA: new adapter orthogonal to earlier ones
    (the older mapping form, `carry: {ewc: {weight: 1000}, replay: true}`, is read too)

Step i trains task i starting from step i-1's model (full weights; a LoRA-type adapter is merged into the
weights the next step starts from, its own adapter kept in the step's final/). After every step the model
is scored on every task's held-out evaluation and on the retention suite. The score R[i][j] of task j after
step i is the evaluation task's main metric oriented so that higher is better: minus the held-out answer
cross-entropy (nats per token) for `eval: auto`, the accuracy for a multiple-choice task. Row 0 is the base
model (zero-shot). From R: average accuracy (mean of the last row), backward transfer
BWT = mean over j < T of (R[T][j] - R[j][j]), forward transfer FWT = mean over j >= 2 of (R[j-1][j] - R[0][j])
and forgetting (mean over j < T of the largest earlier score minus the last), each with a 95% bootstrap
interval over the evaluation items (resampled per task, paired across steps).

Layout of the sequence directory:

    continual/<name>/
      sequence.yaml         the sequence as run
      continual.json        matrix, metrics with intervals, retention trajectory (rewritten after every step)
      matrix.png            heat-map of R (colour: change from the base model)
      trajectory.png        every task's score and the retention score after each step
      report.html           all of it in one page, with each step's training curves and retention tables
      base/                 the base model's evaluation (row 0)
      steps/<i>-<task>/     a normal run directory, plus eval-task.json (+ .items.json) and eval-retention.json
      replay/step-<i>/      the replay buffer step i trained with (one JSONL per earlier task)

Re-running the same command resumes: finished steps are skipped, an interrupted step continues from its
newest complete checkpoint.
"""

from __future__ import annotations

import contextlib
import copy
import json
import random
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Union

import numpy as np
import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from . import train as training  # training.train looked up at call time: tests replace forgetless.train.train
from .config import DataConfig, EvalPrecisionOptions
from .data import load_records
from .errors import ForgetlessError, RecipeError
from .fingerprint import fingerprint_path
from .io import atomic_write_json, atomic_write_text
from .lock import DirLock
from .mitigations import MITIGATION_NAMES, MITIGATIONS, CarryStep, Mitigation
from .models import resolve_model
from .recipe import Recipe, base_recipe_tree, load_config_file, load_recipe, recipe_from_dict
from .report import METRIC_NAMES, write_continual_report, write_plots, write_report  # noqa: F401 (re-exported)
from .results import RetentionChange
from .retention.api import eval_model, eval_precision, load_for_eval
from .retention.evaluate import compare, evaluate, evaluate_cached, result_from_cache
from .retention.suite import Suite, load_suite
from .retention.tasks import resolve_data_root
from .schema import Strict
from .sweep import auto_task_suite
from .train.model import load_model
from .train.run import refuse_diverged

if TYPE_CHECKING:
    from .mitigations.base import MitigationOptions

N_BOOT = 1000

# ---------------------------------------------------------------- the sequence file


class TaskSpec(Strict):
    name: str = Field(description="Task name (its step directory is steps/<i>-<name>).")
    data: dict[str, Any] = Field(description="The task's data: train, validation and any data option, over the base "
                                             "recipe's data:.")
    set: dict[str, Any] = Field(default_factory=dict, description="Recipe overrides for this step (dotted keys).")
    eval: str = Field("auto",
                      description="auto: reference likelihood of data.validation; or a suite (file or built-in name).")
    eval_task: str | None = Field(None, description="Which task of the eval suite (default: its first).")
    metric: str | None = Field(None,
                               description="Which metric of the eval task is the score (default: its main metric).")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._+=,-]*", v):
            raise ValueError(f"{v!r}: a task name is letters, digits and . _ + = , - (it names a directory)")
        return v

    @field_validator("data")
    @classmethod
    def _data_keys(cls, v: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(v) - set(DataConfig.model_fields))
        if unknown:
            raise ValueError(f"unknown data key(s) {', '.join(unknown)}; valid: {', '.join(DataConfig.model_fields)}")
        if "train" not in v:
            raise ValueError("needs train: (the task's training data)")
        return v


def _carried_model(cls: type[Mitigation]) -> type[Strict]:
    """The mitigation's own config as a `carry:` entry: the keys the sequence fills are refused, the mitigation's
    carried defaults apply, and `carried` is true (replay then needs no data: of its own)."""

    class Carried(cls.config_model):  # type: ignore[name-defined,misc]
        carried: ClassVar[bool] = True

        @model_validator(mode="before")
        @classmethod
        def _carry_before(cls_, v: Any) -> Any:
            if isinstance(v, dict):
                filled = sorted(set(v) & set(cls.carry_fills))
                if filled:
                    raise ValueError(f"{filled[0]}: filled in by the sequence for every step; leave it out")
                v = {**cls.carry_defaults, **v}
            return v

    Carried.__name__ = Carried.__qualname__ = f"{cls.config_model.__name__}Carried"
    return Carried


_CARRIED = {n: _carried_model(c) for n, c in MITIGATIONS.items() if c.carryable()}
if TYPE_CHECKING:  # the type checker sees what every mitigation config offers
    CarriedConfig = MitigationOptions
else:
    _carried_union = Union[tuple(_CARRIED.values())]  # noqa: UP007 (built at run time)
    CarriedConfig = Annotated[_carried_union, Field(discriminator="name")]


def _carry_shorthands(v: Any) -> Any:
    """`carry: [ewc, {name: replay, ratio: 0.2}]`; the older mapping form (`{ewc: {...}, replay: true, si: null}`,
    as sequence.yaml files of 0.1 hold it) is read too, replay's policy / per_task / size moving under buffer:."""
    if isinstance(v, dict):
        bad = sorted(k for k, x in v.items() if not isinstance(x, (dict, bool)) and x is not None)
        if bad:
            raise ValueError(f"{bad[0]}: a mapping of options, true or null")
        # 0.1 handed them on in this fixed order, whatever the file's: keep it (mitigations compose in order)
        legacy = ("ewc", "si", "kl", "replay", "olora")
        keys = sorted(v, key=lambda k: legacy.index(k) if k in legacy else len(legacy))
        v = [{"name": k, **({} if v[k] is True else v[k])} for k in keys if v[k] not in (None, False)]
        for e in v:
            if e["name"] == "replay" and {"policy", "per_task", "size"} & set(e):
                e["buffer"] = {k: e.pop(k) for k in ("policy", "per_task", "size") if k in e}
    if isinstance(v, list):
        v = [{"name": e} if isinstance(e, str) else e for e in v]
        names: list[Any] = [e.get("name") for e in v if isinstance(e, dict)]
        for n in names:
            if n is not None and n not in _CARRIED:
                raise ValueError(f"{n!r} cannot be carried from step to step (carried: {', '.join(_CARRIED)})")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"{dup[0]} listed twice")
    return v


class ContinualConfig(EvalPrecisionOptions):
    name: str = "continual"
    base: dict[str, Any] | str = Field(description="The base recipe: a mapping, or a recipe YAML path (relative to the "
                                                   "sequence file).")
    tasks: list[TaskSpec] = Field(min_length=1, description="The tasks, in training order.")
    carry: list[CarriedConfig] = Field(
        default_factory=list, description="Mitigations handed from step to step: a list of mitigation configs "
        "(names or {name: ..., options}); each mitigation fills what only the sequence knows (the previous step's "
        "Fisher, importance, adapters or examples).")

    @field_validator("carry", mode="before")
    @classmethod
    def _carry(cls, v: Any) -> Any:
        return _carry_shorthands(v)

    def carried(self) -> list[dict[str, Any]]:
        """The carry: entries as option mappings (without what the sequence fills)."""
        return [e.model_dump(mode="json", exclude=set(MITIGATIONS[e.name].carry_fills)) for e in self.carry]

    def dump(self) -> dict[str, Any]:
        """The sequence as written to sequence.yaml (carry: without what the sequence fills, so it reads back)."""
        return {**self.model_dump(mode="json"), "carry": self.carried()}
    retention_suite: str | None = Field("self", description="What must not be forgotten (built-in name or suite file); "
                                                            "null: none.")
    limit: int | None = Field(None, gt=0, description="At most this many items per evaluation task.")
    data_root: str | None = Field(None, description="Folder the suites' data paths are relative to.")
    output_dir: str | None = Field(None, description="Sequence directory. Default: continual/<name>.")

    @model_validator(mode="after")
    def _unique(self) -> ContinualConfig:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(dup)}")
        return self


def load_continual(path: str | Path) -> tuple[ContinualConfig, Path]:
    """Read and validate a sequence file; errors name the file, key and line. Returns (config, its folder)."""
    cfg = load_config_file(path, ContinualConfig, "sequence", "a YAML mapping with base: and tasks:",
                           tags=MITIGATION_NAMES)
    return cfg, Path(path).parent


# ---------------------------------------------------------------- the plan: one recipe per step


@dataclass
class Step:
    index: int  # 1-based
    task: TaskSpec
    recipe: Recipe
    dir: Path
    replay: list[tuple[str, Path, list[dict[str, Any]]]] = field(default_factory=list)  # (task, buffer file, records)

    @property
    def model_dir(self) -> Path:
        """The model the next step starts from: the weights, or the adapter merged into them."""
        return self.dir / ("merged" if self.recipe.method.peft and self.recipe.train.merge else "final")


def _resolve(p: str, folder: Path) -> str:
    q = Path(p)
    return str(folder / q) if not q.is_absolute() and (folder / q).is_file() else p


def select_buffer(sizes: list[int], policy: str, per_task: int, size: int, seed: int) -> list[list[int]]:
    """Which examples of each earlier task the replay buffer keeps (indices, per task).

    quota: min(per_task, n) of each task, a fixed-seed sample per task (a task's share never changes as more
    tasks arrive). reservoir: reservoir sampling (algorithm R) of `size` over the stream of all earlier
    tasks' examples in order, so every example seen so far is equally likely to be kept."""
    if policy == "quota":
        return [sorted(random.Random(seed * 1_000_003 + k).sample(range(n), min(per_task, n)))
                for k, n in enumerate(sizes)]
    rng = random.Random(seed)
    buf: list[tuple[int, int]] = []
    seen = 0
    for k, n in enumerate(sizes):
        for i in range(n):
            if len(buf) < size:
                buf.append((k, i))
            else:
                r = rng.randrange(seen + 1)
                if r < size:
                    buf[r] = (k, i)
            seen += 1
    return [sorted(i for kk, i in buf if kk == k) for k in range(len(sizes))]


def _train_records(recipe: Recipe) -> list[dict[str, Any]]:
    recs = load_records(recipe.data.train, recipe.data.split)
    recs = recs[: recipe.data.limit] if recipe.data.limit else recs
    return [r.data for r in recs]


def _carry_mitigations(cfg: ContinualConfig, i: int, prev: list[Step],
                       buffer: list[tuple[str, Path, dict]]) -> list[dict[str, Any]]:
    """The carried mitigations' configs for step i (each mitigation's `carry` decides; forgetless.mitigations)."""
    step = CarryStep(index=i, previous=[s.dir for s in prev],
                     previous_data=[s.recipe.data.model_dump(mode="json") for s in prev],
                     buffer=[d for _, _, d in buffer])
    out = []
    for entry in cfg.carried():
        options = {k: v for k, v in entry.items() if k != "name"}
        made = MITIGATIONS[entry["name"]].carry(options, step)
        if made is not None:
            out.append(made)
    return out


def _buffer_spec(cfg: ContinualConfig) -> dict[str, Any] | None:
    """Which earlier tasks' examples to keep, if a carried mitigation replays them (replay's buffer options)."""
    for entry in cfg.carried():
        spec = MITIGATIONS[entry["name"]].carry_buffer(entry)
        if spec is not None:
            return spec
    return None


def plan(cfg: ContinualConfig, folder: Path, out: Path, where: str = "sequence") -> list[Step]:
    """Every step's recipe, validated up front (data files are read for the replay buffer)."""
    base, source = base_recipe_tree(cfg.base if isinstance(cfg.base, dict) else _resolve(cfg.base, folder),
                                    f"{where}: base")
    clash = sorted({m if isinstance(m, str) else m.get("name") for m in base.get("mitigations") or []}
                   & {e.name for e in cfg.carry})
    if clash:
        raise RecipeError(f"{where}: carry.{clash[0]} and a {clash[0]} mitigation in the base recipe: keep one (carry: "
                          "hands it from step to step)")
    steps: list[Step] = []
    records: list[list[dict[str, Any]]] = []
    for i, task in enumerate(cfg.tasks, 1):
        label = f"{where} tasks[{i - 1}] ({task.name})"
        run_dir = out / "steps" / f"{i}-{task.name}"
        tree = copy.deepcopy(base)
        data = {k: v for k, v in (tree.get("data") or {}).items()
                if k not in ("train", "validation", "validation_fraction")}
        tree["data"] = {**data, **task.data}
        if steps:
            model = tree.get("model")
            tree["model"] = {**(model if isinstance(model, dict) else {}), "name": str(steps[-1].model_dir.resolve())}
        tree["name"] = f"{i}-{task.name}"
        tree["train"] = {**(tree.get("train") or {}), "output_dir": str(run_dir)}
        overrides = [f"{k}={json.dumps(v)}" for k, v in task.set.items()]
        probe = recipe_from_dict(tree, overrides, source=label)
        method = probe.method
        if method.peft and method.can_merge():
            # the next step starts from the merged weights; this step's adapter stays in final/
            tree["train"]["merge"] = True
        elif method.peft and i < len(cfg.tasks):
            raise RecipeError(f"{label}: method {method.name!r} cannot be merged into the weights, so the next "
                              "step cannot start from it; use full, freeze, lora, dora, qlora, ia3 or adapter with "
                              "activation: identity")
        buffer: list[tuple[str, Path, dict]] = []
        keep: list[tuple[str, Path, list[dict[str, Any]]]] = []
        spec = _buffer_spec(cfg)
        if spec is not None and i >= 2:
            chosen = select_buffer([len(x) for x in records], spec["policy"], spec["per_task"], spec["size"],
                                   spec["seed"])
            for prev, recs, idx in zip(steps, records, chosen, strict=True):
                if not idx:
                    continue
                path = (out / "replay" / f"step-{i}" / f"{prev.index}-{prev.task.name}.jsonl").resolve()
                d = prev.recipe.data.model_dump(mode="json")
                d.update({"train": str(path), "validation": None, "validation_fraction": 0.0, "limit": None,
                          "split": "train", "self_distill": None})  # the kept examples as they were written
                buffer.append((prev.task.name, path, d))
                keep.append((prev.task.name, path, [recs[k] for k in idx]))
        tree["mitigations"] = list(tree.get("mitigations") or []) + _carry_mitigations(cfg, i, steps, buffer)
        recipe = recipe_from_dict(tree, overrides, source=label)
        steps.append(Step(i, task, recipe, run_dir, keep))
        if spec is not None and i < len(cfg.tasks):
            records.append(_train_records(recipe))
    return steps


# ---------------------------------------------------------------- what is scored


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
            s = load_suite(_resolve(step.task.eval, folder))
            t = s.only([step.task.eval_task]).tasks[0] if step.task.eval_task else s.tasks[0]
        tasks.append(t.model_copy(update={"name": step.task.name}))
    suite = Suite(name=f"{cfg.name}-tasks", description="each task's held-out evaluation", tasks=tasks)
    return suite.with_limit(cfg.limit)


def _metric_of(result: Any, spec: TaskSpec) -> tuple[Any, float]:
    name = spec.metric or result.main
    names = [m.name for m in result.metrics]
    if name not in names:
        raise ForgetlessError(f"task {spec.name}: metric {name!r} is not reported by its eval task (kind "
                              f"{result.kind}); valid: {', '.join(names)}")
    m = result.metric(name)
    return m, 1.0 if m.higher_is_better else -1.0


# ---------------------------------------------------------------- the accuracy matrix and transfer metrics


def sequence_metrics(R: np.ndarray, t: int | None = None) -> dict[str, np.ndarray | None]:
    """Continual-learning metrics from a score matrix R[..., i, j] (row 0: the base model; row i: after step i,
    which trained task i (column i - 1); higher is better), after step t (default: the last row).

    average_accuracy = mean_{j <= t} R[t][j]; bwt = mean_{j < t} (R[t][j] - R[j][j]);
    fwt = mean_{2 <= j <= t} (R[j-1][j] - R[0][j]); forgetting = mean_{j < t} (max_{j <= l < t} R[l][j] - R[t][j])
    (tasks 1-based). Leading dimensions (bootstrap resamples) are kept."""
    t = R.shape[-2] - 1 if t is None else t
    out: dict[str, np.ndarray | None] = {"average_accuracy": None, "bwt": None, "fwt": None, "forgetting": None}
    if t >= 1:
        out["average_accuracy"] = R[..., t, :t].mean(-1)
    if t >= 2:
        j = np.arange(t - 1)  # 0-based columns of the tasks trained before step t
        out["bwt"] = (R[..., t, j] - R[..., j + 1, j]).mean(-1)
        k = np.arange(1, t)
        out["fwt"] = (R[..., k, k] - R[..., 0, k]).mean(-1)
        out["forgetting"] = np.stack([R[..., c + 1 : t, c].max(-1) - R[..., t, c] for c in j], -1).mean(-1)
    return out


def score_matrix(rows: list[dict[str, Any]], specs: list[TaskSpec], n_boot: int = N_BOOT, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """R[i][j] and its bootstrap resamples B[b][i][j] from per-item results (rows[i][task] = TaskResult).
    Items are resampled once per task and the same resample is used in every row (paired across steps)."""
    R = np.full((len(rows), len(specs)), np.nan)
    B = np.full((n_boot, len(rows), len(specs)), np.nan)
    for j, spec in enumerate(specs):
        first = rows[0][spec.name]
        idx = np.random.default_rng(seed + j).integers(0, first.n, size=(n_boot, first.n))
        for i, row in enumerate(rows):
            r = row[spec.name]
            if r.item_ids != first.item_ids:
                raise ForgetlessError(f"task {spec.name}: step {i} was scored on other items than the base model; "
                                      "the evaluation data changed: run again with --overwrite")
            m, sign = _metric_of(r, spec)
            R[i, j] = sign * float(m.fn(r.columns))
            B[:, i, j] = sign * m.fn({c: v[idx] for c, v in r.columns.items()})
    return R, B


def _ci(dist: np.ndarray) -> list[float]:
    return [float(np.nanquantile(dist, 0.025)), float(np.nanquantile(dist, 0.975))]


def summarize(R: np.ndarray, B: np.ndarray) -> dict[str, Any]:
    """Matrix with intervals, final metrics and their trajectory over steps, as JSON-ready values."""
    def with_ci(point: dict, dist: dict) -> dict:
        return {k: (None if v is None else {"value": float(v), "ci": _ci(dist[k])}) for k, v in point.items()}

    traj = [{"step": t, **with_ci(sequence_metrics(R, t), sequence_metrics(B, t))} for t in range(R.shape[0])]
    return {
        "score": R.tolist(),
        "ci": [[_ci(B[:, i, j]) for j in range(R.shape[1])] for i in range(R.shape[0])],
        "metrics": {k: v for k, v in traj[-1].items() if k != "step"},
        "trajectory": traj,
    }


# ---------------------------------------------------------------- evaluation


def _save_items(path: Path, res: Any) -> None:
    atomic_write_json(path, {"suite": res.suite, "model": res.model, "seconds": res.seconds,
                             "tasks": {n: r.to_cache() for n, r in res.tasks.items()}})


def _load_items(path: Path, suite: Any) -> dict[str, Any]:
    d = json.loads(path.read_text())
    by_name = {t.name: t for t in suite.tasks}
    missing = set(by_name) - set(d["tasks"])
    if missing:
        raise ForgetlessError(f"{path}: no scores for task(s) {', '.join(sorted(missing))}; run again with --overwrite")
    return {n: result_from_cache(d["tasks"][n], by_name[n]) for n in by_name}


class _Evaluator:
    """Scores models on the task suite (per-item results kept) and on the retention suite (eval_model)."""

    def __init__(self, cfg: ContinualConfig, suite: Any, retention: Any, base_path: str, quiet: bool):
        self.cfg, self.suite, self.retention, self.base_path, self.quiet = cfg, suite, retention, base_path, quiet
        self.base_fp = fingerprint_path(base_path)
        self._base: Any = None
        # resolved once: every step and the base are scored at one precision (the cache keys on it)
        self.precision = eval_precision(cfg.eval_setting(), base_path)
        self.bf16 = self.precision.bf16

    def load_base(self) -> Any:
        if self._base is None:
            m, t = load_model(self.base_path)
            self._base = (m.eval(), t)
        return self._base

    def _run(self, model_dir: str) -> Any:
        model, tok, path = load_for_eval(model_dir)
        return evaluate(model, tok, self.suite, data_root=self.cfg.data_root, bf16=self.bf16, reference=self.load_base,
                        reference_fingerprint=self.base_fp, progress=not self.quiet, model_name=path)

    def base_row(self, out: Path) -> Any:
        key = {"model": self.base_fp, "bf16": self.bf16, "max_length": None,
               "suite": self.suite.fingerprint(resolve_data_root(self.cfg.data_root))}
        res, _ = evaluate_cached(key, self.suite, lambda: self._run(self.base_path))
        _save_items(out / "base" / "eval-task.items.json", res)
        return res

    def step(self, step: Step, base_res: Any) -> tuple[Any, dict[str, Any] | None]:
        """Task scores (SuiteResult) and the retention report of one step's model; both written to its directory."""
        res = self._run(str(step.dir))
        _save_items(step.dir / "eval-task.items.json", res)
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
                             out=step.dir / "eval-retention.json", progress=not self.quiet)
        return res, ret


def _retention_entry(report: dict[str, Any] | None) -> dict[str, Any] | None:
    if not report or not report.get("comparison"):
        return None
    return RetentionChange.of(report["comparison"]).as_dict(
        "score", "change", "ci", "significant_drops", "tasks",
        task_fields=("main", "base", "candidate", "delta", "ci", "significant_drop"))


# ---------------------------------------------------------------- the run


def _train_step(step: Step, quiet: bool) -> dict[str, Any]:
    summary_path = step.dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        refuse_diverged(summary, summary_path, f"step {step.index} ({step.task.name})")
        return summary
    for _, path, recs in step.replay:
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in recs))
    resume = (step.dir / "recipe.yaml").is_file() and (step.dir / "checkpoints").is_dir()
    return training.train(step.recipe, resume=resume, overwrite=not resume, quiet=quiet, report=write_report).summary


def _step_entry(step: Step, summary: dict[str, Any], retention: dict[str, Any] | None,
                seconds: float) -> dict[str, Any]:
    return {
        "step": step.index, "task": step.task.name, "dir": str(step.dir), "model": str(step.model_dir),
        "method": summary["method"], "complete": True,
        "train": {k: summary.get(k) for k in ("steps", "wall_time_s", "tokens_per_s", "peak_memory_mb",
                                              "trainable_parameters",
                                              "initial_validation_loss", "final_validation_loss")},
        "mitigations": summary.get("mitigations", []),
        "replay_buffer": {task: len(recs) for task, _, recs in step.replay},
        "retention": retention,
        "seconds": round(seconds, 1),
    }


def _fmt(m: dict[str, Any] | None, pct: bool = False) -> str:
    if not m:
        return "-"
    f = (lambda x: f"{100 * x:+.2f}%") if pct else (lambda x: f"{x:+.3f}")
    return f"{f(m['value'])} [{f(m['ci'][0])}, {f(m['ci'][1])}]"


def run_continual(
    path_or_config: str | Path | ContinualConfig,
    *,
    folder: Path | None = None,
    output_dir: str | Path | None = None,
    overwrite: bool = False,
    quiet: bool = False,
    report: bool = True,
    break_lock: bool = False,
) -> dict[str, Any]:
    """Run (or resume) a task sequence; returns the content of continual.json. The sequence directory is locked
    while it runs (forgetless.lock): a second run on it is refused."""
    with contextlib.ExitStack() as locks:
        return _run_continual(path_or_config, folder=folder, output_dir=output_dir, overwrite=overwrite, quiet=quiet,
                              report=report, lock=lambda out: locks.enter_context(
                                  DirLock(out, "continual directory", break_lock=break_lock)))


def _run_continual(path_or_config: str | Path | ContinualConfig, *, folder: Path | None,
                   output_dir: str | Path | None, overwrite: bool, quiet: bool, report: bool,
                   lock: Callable[[Path], Any]) -> dict[str, Any]:
    from rich.console import Console

    if isinstance(path_or_config, ContinualConfig):
        cfg, folder, where = path_or_config, folder or Path.cwd(), "sequence"
    else:
        cfg, folder = load_continual(path_or_config)
        where = str(path_or_config)
    console = Console(stderr=True, quiet=quiet)
    out = Path(output_dir or cfg.output_dir or f"continual/{cfg.name}")
    state_path = out / "continual.json"
    steps = plan(cfg, folder, out, where)  # every recipe validated, every data file read, before anything is written
    suite = task_suite(cfg, steps, folder)
    retention = load_suite(_resolve(cfg.retention_suite, folder)) if cfg.retention_suite else None

    seq_dump = {k: v for k, v in cfg.dump().items() if k != "output_dir"}
    lock(out)
    if out.exists() and any(out.iterdir()):
        if overwrite:
            shutil.rmtree(out)
        elif not state_path.is_file():
            raise ForgetlessError(f"{out} exists and is not a continual directory; pass --overwrite or choose another "
                                  "output_dir")
        else:
            saved = yaml.safe_load((out / "sequence.yaml").read_text()) if (out / "sequence.yaml").is_file() else None
            if saved is not None:  # read through today's schema: a sequence.yaml of an older version compares equal
                try:
                    saved = {k: v for k, v in ContinualConfig.model_validate(saved).dump().items() if k != "output_dir"}
                except ValidationError:
                    saved = {"unreadable": True}
            if saved is not None and saved != seq_dump:
                raise ForgetlessError(f"{where}: the sequence changed since {out / 'sequence.yaml'} was written; "
                                      "pass --overwrite to start again (or choose another output_dir)")
            for s in steps:
                saved_recipe = s.dir / "recipe.yaml"
                if saved_recipe.is_file() and load_recipe(saved_recipe).resolved() != s.recipe.resolved():
                    raise ForgetlessError(f"step {s.index} ({s.task.name}): its recipe changed since "
                                          f"{saved_recipe} was written; pass --overwrite to start the sequence again")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sequence.yaml", yaml.safe_dump(cfg.dump(), sort_keys=False))

    base_path = resolve_model(steps[0].recipe.model.name).path
    evaluator = _Evaluator(cfg, suite, retention, base_path, quiet)
    prior = json.loads(state_path.read_text()) if state_path.is_file() else {}
    done = {e["step"]: e for e in prior.get("steps", []) if e.get("complete")}
    T = len(steps)
    carried = ", ".join(e.name for e in cfg.carry) or "nothing"
    console.print(f"[bold]continual {cfg.name}[/bold]: {T} tasks ({len(done)} done), method "
                  f"{steps[0].recipe.method.name}, carry {carried}, retention suite "
                  f"{retention.name if retention else 'none'} -> {out}")
    base_res = evaluator.base_row(out)
    rows = [base_res.tasks]
    specs = [s.task for s in steps]
    for spec in specs:
        _metric_of(base_res.tasks[spec.name], spec)  # an unknown metric fails before any training
    state: dict[str, Any] = {
        "name": cfg.name, "dir": str(out), "base_model": base_path, "method": steps[0].recipe.method.name,
        "carry": cfg.carried(), "retention_suite": retention.name if retention else None,
        "tasks": [], "steps": [], "matrix": None, "metrics": None, "trajectory": None, "complete": False,
    }
    for spec in specs:
        m, sign = _metric_of(base_res.tasks[spec.name], spec)
        state["tasks"].append({"name": spec.name, "metric": m.name, "higher_is_better": m.higher_is_better,
                               "score": m.name if sign > 0 else f"-{m.name}", "n": base_res.tasks[spec.name].n})

    def save() -> dict[str, Any]:
        R, B = score_matrix(rows, specs)
        summ = summarize(R, B)
        state["matrix"] = {"rows": ["base"] + [f"{e['step']}-{e['task']}" for e in state["steps"]],
                           "columns": [s.name for s in specs], "score": summ["score"], "ci": summ["ci"]}
        state["metrics"] = summ["metrics"]
        for t, entry in enumerate(summ["trajectory"]):
            ret = state["steps"][t - 1]["retention"] if t else (
                {"score": 1.0, "change": 0.0, "ci": [0.0, 0.0], "significant_drops": []} if retention else None)
            entry["after"] = "base" if t == 0 else state["steps"][t - 1]["task"]
            entry["retention"] = None if ret is None else {k: ret[k]
                                                           for k in ("score", "change", "ci", "significant_drops")}
        state["trajectory"] = summ["trajectory"]
        state["complete"] = len(state["steps"]) == T
        atomic_write_json(state_path, state)
        return summ

    save()  # from here on the directory is a sequence directory: a crash in step 1 resumes too
    for step in steps:
        t0 = time.perf_counter()
        prev = done.get(step.index)
        items = step.dir / "eval-task.items.json"
        if prev and items.is_file() and (retention is None or (step.dir / "eval-retention.json").is_file()):
            rows.append(_load_items(items, suite))
            state["steps"].append(prev)
            console.print(f"step {step.index}/{T} {step.task.name}: done earlier, skipped")
            continue
        console.print(f"[bold]step {step.index}/{T}[/bold] {step.task.name}: training"
                      + (f" from {steps[step.index - 2].task.name}'s model" if step.index > 1
                         else " from the base model")
                      + (f", replaying {sum(len(r) for _, _, r in step.replay)} earlier examples" if step.replay
                         else ""))
        summary = _train_step(step, quiet)
        res, ret = evaluator.step(step, base_res)
        if step.recipe.train.report:
            write_report(step.dir)  # now with the step's evaluations
        rows.append(res.tasks)
        state["steps"].append(_step_entry(step, summary, _retention_entry(ret), time.perf_counter() - t0))
        summ = save()
        i, j = step.index, step.index - 1
        m = summ["metrics"]
        r = state["steps"][-1]["retention"]
        console.print(
            f"step {i}/{T} {step.task.name}: {summary['steps']} steps in {summary['wall_time_s']:.0f}s; "
            f"score {summ['score'][i][j]:+.3f} (base {summ['score'][0][j]:+.3f}); average "
            f"{_fmt(m['average_accuracy'])}, BWT {_fmt(m['bwt'])}; retention "
            + (f"{100 * r['change']:+.2f}% [{100 * r['ci'][0]:+.2f}%, {100 * r['ci'][1]:+.2f}%]" if r else "-")
        )
    save()
    state["plots"] = write_plots(state, out)
    if report:
        state["report"] = str(write_continual_report(out, state))
    atomic_write_json(state_path, state)
    return state


# ---------------------------------------------------------------- table


def continual_table(state: dict[str, Any]) -> Any:
    """The accuracy matrix as a rich table (rows: models; columns: tasks), with the metrics in its caption."""
    from rich.table import Table

    scores = ", ".join(sorted({t["score"] for t in state["tasks"]}))
    t = Table(title=f"continual {state['name']}: score R[i][j] ({scores}, higher is better) [95% CI]")
    t.add_column("after step")
    for c in state["matrix"]["columns"]:
        t.add_column(c, justify="right")
    t.add_column("retention change", justify="right")
    for i, name in enumerate(state["matrix"]["rows"]):
        cells = []
        for j in range(len(state["matrix"]["columns"])):
            v, (lo, hi) = state["matrix"]["score"][i][j], state["matrix"]["ci"][i][j]
            text = f"{v:.3f} [{lo:.3f}, {hi:.3f}]"
            cells.append(f"[bold]{text}[/bold]" if i == j + 1 else text)
        ret = state["trajectory"][i].get("retention")
        cells.append(f"{100 * ret['change']:+.2f}% [{100 * ret['ci'][0]:+.2f}%, {100 * ret['ci'][1]:+.2f}%]"
                     if ret and i else "-")
        t.add_row(name, *cells)
    m = state["metrics"]
    t.caption = (f"average {_fmt(m['average_accuracy'])}   BWT {_fmt(m['bwt'])}   FWT {_fmt(m['fwt'])}   "
                 f"forgetting {_fmt(m['forgetting'])}")
    return t
