"""Task definitions (data, like lm-eval's YAML) and what every task kind returns.

A task names its data source, a sample limit with a fixed seed, shots, a weight, and Jinja templates that
turn a record into the text the kind needs. Each kind (perplexity, multiple_choice, generate,
self_reference, lm_eval) is a small module under `kinds/` with its own options.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import jinja2
import numpy as np
from pydantic import Field

from ..data.loading import Record, read_file
from ..errors import DataError, ForgetlessError
from ..schema import NoExtra
from .metrics import Columns, Metric


class HubSource(NoExtra):
    """Where a task's local file comes from: `forgetless data pull` fetches it (retention/pull.py)."""

    hub: str = Field(description="HF dataset id, e.g. google-research-datasets/nq_open")
    config: str | None = Field(None, description="Dataset config (subset), if any.")
    split: str = Field(description="The split the local file holds.")
    convert: Literal["jsonl", "arc", "piqa", "flores", "text"] = Field(
        "jsonl", description="How hub rows become the local file (see retention/pull.py)."
    )
    verified: bool = Field(False, description="Whether this mapping was checked against the hub (false: written "
                                              "without hub access).")
    note: str | None = None


class MissingDataError(DataError):
    """A task's data file is not there."""


class DataSource(NoExtra):
    path: str | None = Field(None,
                             description="File relative to the suite's data_root, or absolute. .jsonl/.json(.gz)/.txt")
    hf: str | None = Field(None, description="HF dataset id (online only), e.g. allenai/ai2_arc")
    hf_config: str | None = None
    split: str = "test"
    labels_path: str | None = Field(None, description="One label per line, merged into each record as `label` (PIQA).")
    text_split: Literal["documents", "lines", "wikitext"] = Field(
        "documents",
        description=".txt files: wikitext = one document per top-level '= Title =' heading; lines = one per line."
    )
    source: HubSource | None = Field(None, description="The public dataset the local file comes from (for `forgetless "
                                                       "data pull`).")


class ExcludeSample(NoExtra):
    """Items another task's fixed-seed sample holds (same data file): a probe that scores items a suite does not."""

    limit: int = Field(gt=0, description="The other task's limit.")
    seed: int = Field(1234, description="The other task's seed.")
    sample: Literal["random", "first"] = "random"


class TaskBase(NoExtra):
    name: str
    kind: str
    data: DataSource | None = None
    limit: int | None = Field(None, gt=0, description="Evaluate this many items (a fixed-seed sample).")
    sample: Literal["random", "first"] = "random"
    seed: int = 1234
    shots: int = Field(0, ge=0)
    exclude: ExcludeSample | None = Field(
        None,
        description="Never score the items of this (limit, seed) sample of the same data: e.g. a probe that mirrors "
        "`general` on items `general` does not score."
    )
    weight: float = Field(1.0, gt=0, description="Weight in the retention score (within its ability, when it has one).")
    ability: str | None = Field(
        None, pattern=r"^[a-z][a-z0-9_]*$",
        description="The ability the task measures (knowledge, commonsense, language_modelling, own_distribution, "
        "basic_skills, or your own): abilities weigh equally in the retention score; a task without one is its own.",
    )

    @property
    def main(self) -> str:
        """The metric the retention score uses: each kind's `main_metric` option."""
        return str(self.main_metric)  # type: ignore[attr-defined]  # every kind declares it


@dataclass
class TaskResult:
    """Per-item columns plus the metrics that aggregate them; `main` is the metric the retention score uses."""

    task: str
    kind: str
    columns: Columns
    metrics: list[Metric]
    main: str
    item_ids: list[str]
    details: list[dict[str, Any]] = field(default_factory=list)  # per item: prediction, correct, text (for flips)
    info: dict[str, Any] = field(default_factory=dict)  # counts: truncated, seconds, tokens
    ability: str | None = None  # from the task definition (not cached: a suite may re-tag its tasks)
    weight: float = 1.0  # from the task definition (not cached): its weight in the retention score

    @classmethod
    def of(cls, task: TaskBase, columns: Columns, metrics: list[Metric], item_ids: list[str],
           details: list[dict[str, Any]] | None = None, info: dict[str, Any] | None = None,
           main: str | None = None) -> TaskResult:
        """A task's result: name and kind from the task, `main` its `main_metric` unless given."""
        return cls(task.name, task.kind, columns, metrics, main or task.main, item_ids,
                   details or [], info or {})

    def metric(self, name: str) -> Metric:
        return next(m for m in self.metrics if m.name == name)

    @property
    def main_metric(self) -> Metric:
        return self.metric(self.main)

    @property
    def n(self) -> int:
        return len(self.item_ids)

    def to_cache(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "kind": self.kind,
            "main": self.main,
            "item_ids": self.item_ids,
            "columns": {k: v.tolist() for k, v in self.columns.items()},
            "details": self.details,
            "info": self.info,
        }


# ---------------------------------------------------------------- data


def resolve_data_root(data_root: str | Path | None) -> Path | None:
    """Where suite data paths are relative to: the argument, $FORGETLESS_DATA, or ../shared/data if present."""
    for cand in (data_root, os.environ.get("FORGETLESS_DATA"), Path.cwd().parent / "shared" / "data",
                 Path.cwd() / "data"):
        if cand and Path(cand).expanduser().is_dir():
            return Path(cand).expanduser()
    return Path(data_root).expanduser() if data_root else None


def _read_text_docs(path: Path, how: str) -> list[Record]:
    text = path.read_text(encoding="utf-8")
    if how == "lines":
        return [Record({"text": ln}, str(path), i + 1) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    if how == "wikitext":
        docs: list[Record] = []
        cur: list[str] = []
        start = 1
        lines = text.splitlines(keepends=True)
        for i, ln in enumerate(lines):
            s = ln.strip()
            is_title = s.startswith("= ") and s.endswith(" =") and not s.startswith("= =")
            if is_title and any(x.strip() for x in cur):
                docs.append(Record({"text": "".join(cur).strip("\n")}, str(path), start))
                cur, start = [], i + 1
            cur.append(ln)
        if any(x.strip() for x in cur):
            docs.append(Record({"text": "".join(cur).strip("\n")}, str(path), start))
        return docs
    return [Record({"text": text}, str(path), 1)]


def load_rows(task: TaskBase, data_root: Path | None) -> list[Record]:
    src = task.data
    if src is None:
        raise ForgetlessError(f"task {task.name}: no data source (data.path or data.hf)")
    if src.hf:
        from ..data.loading import require_hub

        require_hub(f"task {task.name}: hf:{src.hf}")
        try:
            import datasets

            ds = datasets.load_dataset(src.hf, src.hf_config, split=src.split)
        except Exception as e:  # noqa: BLE001 - any failure means the same to the user
            raise DataError(
                f"task {task.name}: cannot load hf:{src.hf} ({src.hf_config or 'default'}, {src.split}): {e}. "
                "Offline? Download it once elsewhere and point data.path at a local file."
            ) from None
        rows = [Record(dict(r), f"hf:{src.hf}[{src.split}]", i + 1) for i, r in enumerate(ds)]
    else:
        if not src.path:
            raise ForgetlessError(f"task {task.name}: data needs path or hf")
        path = Path(src.path).expanduser()
        if not path.is_absolute():
            if data_root is None:
                raise ForgetlessError(
                    f"task {task.name}: data.path {src.path!r} is relative but no data root is set; pass --data-root "
                    "or set FORGETLESS_DATA to the folder holding the evaluation files"
                )
            path = data_root / path
        if not path.is_file():
            raise MissingDataError(
                f"task {task.name}: data file {path} not found (data root {data_root}); pass --data-root or set "
                "FORGETLESS_DATA, or edit the task's data.path" + how_to_get(task)
            )
        if path.suffix == ".txt":
            rows = _read_text_docs(path, src.text_split)
        else:
            rows = read_file(path)
        if src.labels_path:
            lp = Path(src.labels_path)
            lp = lp if lp.is_absolute() else (data_root / lp if data_root else lp)
            if not lp.is_file():
                raise MissingDataError(f"task {task.name}: labels file {lp} not found (data root {data_root})"
                                       + how_to_get(task))
            labels = [ln.strip() for ln in lp.read_text().splitlines() if ln.strip()]
            if len(labels) != len(rows):
                raise DataError(f"task {task.name}: {lp} has {len(labels)} labels for {len(rows)} records in {path}")
            for r, lab in zip(rows, labels, strict=True):
                r.data["label"] = lab
    if not rows:
        raise DataError(f"task {task.name}: the data source is empty")
    return rows


def how_to_get(task: TaskBase, suite: str = "SUITE") -> str:
    """The sentence a missing-file error ends with: where the file comes from and the command that writes it."""
    src = task.data.source if task.data else None
    if src is None:
        return ""
    where = f"hf:{src.hub}" + (f" (config {src.config}" if src.config else " (") + f", split {src.split})"
    return (f". It comes from {where}: `forgetless data pull {suite} --to DIR` writes it (needs the hub), then pass "
            f"--data-root DIR" + ("" if src.verified else "; this hub mapping was not verified against the hub"))


def _sample_indices(n: int, limit: int | None, seed: int, how: str, pool: list[int] | range | None = None) -> list[int]:
    pool = range(n) if pool is None else pool
    if limit is None or limit >= len(pool):
        return list(pool)
    if how == "first":
        return list(pool[:limit])
    return sorted(random.Random(seed).sample(pool, limit))


def sample_indices(task: TaskBase, n: int) -> list[int]:
    """The indices of the task's fixed-seed sample of `n` items (all of them without a limit), outside
    `exclude`'s sample if set."""
    pool: list[int] | range = range(n)
    if task.exclude is not None:
        ex = task.exclude
        taken = set(_sample_indices(n, ex.limit, ex.seed, ex.sample))
        pool = [i for i in pool if i not in taken]
        if not pool:
            raise DataError(f"task {task.name}: exclude (limit {ex.limit}, seed {ex.seed}) leaves no item of {n}")
    return _sample_indices(n, task.limit, task.seed, task.sample, pool)


def sample_rows(task: TaskBase, rows: list[Record]) -> list[Record]:
    """The task's fixed-seed sample of `rows` (sample_indices)."""
    return [rows[i] for i in sample_indices(task, len(rows))]


# ---------------------------------------------------------------- templates


def _hellaswag(text: str) -> str:
    import re

    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


TEMPLATE_ENV = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
TEMPLATE_ENV.filters["hellaswag"] = _hellaswag
TEMPLATE_ENV.filters["capitalize_first"] = lambda s: s[:1].upper() + s[1:] if s else s


def render(template: str, rec: Record, task: str, key: str) -> Any:
    """Render a Jinja template against a record; a bare field name returns the raw value (lists stay lists)."""
    if template in rec.data and "{" not in template:
        return rec.data[template]
    try:
        return TEMPLATE_ENV.from_string(template).render(**rec.data)
    except jinja2.UndefinedError as e:
        raise DataError(f"{rec.where}: task {task}: {key} template {template!r}: {e.message}; fields: "
                        f"{', '.join(rec.data)}") from None
    except jinja2.TemplateError as e:
        raise ForgetlessError(f"task {task}: {key} template {template!r} is not valid Jinja: {e}") from None


def item_id(rec: Record) -> str:
    for k in ("id", "ind", "question_id", "task_id", "idx"):
        if k in rec.data:
            return str(rec.data[k])
    return rec.where


def fewshot_pool(task: TaskBase, rows: list[Record], chosen: list[Record]) -> list[Record]:
    ids = {id(r) for r in chosen}
    return [r for r in rows if id(r) not in ids] or rows


def rows_and_shot_pool(task: TaskBase, data_root: Path | None) -> tuple[list[Record], list[Record]]:
    """The task's scored rows and the rows its few-shot examples are drawn from (none without `shots`)."""
    all_rows = load_rows(task, data_root)
    rows = sample_rows(task, all_rows)
    return rows, fewshot_pool(task, all_rows, rows) if task.shots else []


_Shot = TypeVar("_Shot")  # a Record, or a kind's built item (multiple choice)


def pick_shots(pool: list[_Shot], k: int, seed: int, exclude: _Shot | None = None) -> list[_Shot]:
    if k == 0:
        return []
    cands = [r for r in pool if r is not exclude]
    return random.Random(seed).sample(cands, min(k, len(cands)))


def as_array(values: list[float]) -> np.ndarray:
    return np.asarray(values, dtype=np.float64)
