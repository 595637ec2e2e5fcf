"""Retention suites: a YAML list of tasks (built-in `general` and `self`, or any file)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..errors import ForgetlessError
from ..schema import load_config_file
from .kinds.generate import GenerateTask
from .kinds.knowledge_qa import KnowledgeQATask
from .kinds.lm_eval import LmEvalTask
from .kinds.multiple_choice import MultipleChoiceTask
from .kinds.perplexity import PerplexityTask
from .kinds.reference_likelihood import ReferenceLikelihoodTask
from .kinds.self_reference import SelfReferenceTask

BUILTIN_DIR = Path(__file__).resolve().parent / "suites"
KIND_NAMES = ("multiple_choice", "perplexity", "generate", "self_reference", "lm_eval", "reference_likelihood",
              "knowledge_qa")

Task = Annotated[
    MultipleChoiceTask | PerplexityTask | GenerateTask | SelfReferenceTask | LmEvalTask | ReferenceLikelihoodTask
    | KnowledgeQATask,
    Field(discriminator="kind"),
]


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    tasks: list[Task]

    @model_validator(mode="before")
    @classmethod
    def _shorthands(cls, v: Any) -> Any:
        """`- lm_eval:arc_easy` is short for an lm_eval task of that name."""
        if isinstance(v, dict) and isinstance(v.get("tasks"), list):
            tasks = []
            for t in v["tasks"]:
                if isinstance(t, str) and t.startswith("lm_eval:"):
                    t = {"name": t.split(":", 1)[1], "kind": "lm_eval", "task": t.split(":", 1)[1]}
                tasks.append(t)
            v = {**v, "tasks": tasks}
        return v

    @model_validator(mode="after")
    def _unique(self) -> Suite:
        names = [t.name for t in self.tasks]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"task names must be unique; repeated: {', '.join(sorted(dup))}")
        if not self.tasks:
            raise ValueError("a suite needs at least one task")
        return self

    def with_limit(self, limit: int | None) -> Suite:
        """Cap every task's item count (a quick look; the fixed-seed sample stays a prefix-stable choice)."""
        if limit is None:
            return self
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ForgetlessError(f"--limit {limit}: the number of items per task must be a whole number of at least 1")
        tasks = [t.model_copy(update={"limit": min(limit, t.limit or limit)}) for t in self.tasks]
        return self.model_copy(update={"tasks": tasks})

    def only(self, names: list[str] | None) -> Suite:
        if not names:
            return self
        unknown = set(names) - {t.name for t in self.tasks}
        if unknown:
            raise ForgetlessError(f"suite {self.name}: no task named {', '.join(sorted(unknown))}; has "
                                  f"{', '.join(t.name for t in self.tasks)}")
        return self.model_copy(update={"tasks": [t for t in self.tasks if t.name in names]})

    def data_files(self, data_root: Path | None) -> list[tuple[str, Path]]:
        """Every data file the suite reads: (the path as the suite names it, where it is under `data_root`)."""
        out = []
        for t in self.tasks:
            for rel in ([t.data.path, t.data.labels_path] if t.data else []):
                if rel:
                    out.append((rel, Path(rel) if Path(rel).is_absolute() or data_root is None else data_root / rel))
        return out

    def fingerprint(self, data_root: Path | None) -> str:
        """Hash of the suite definition and of the data files it reads (by path, size and mtime)."""
        spec: dict[str, Any] = {"suite": self.model_dump(mode="json"), "files": {}}
        for rel, p in self.data_files(data_root):
            if p.is_file():
                st = p.stat()
                spec["files"][rel] = [st.st_size, int(st.st_mtime)]
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]

    def missing_files(self, data_root: Path | None) -> list[str]:
        """The data files (relative paths as the suite names them) not found under `data_root`."""
        return [rel for rel, p in self.data_files(data_root) if not p.is_file()]


# the monitor's default probe: the mirror of `general` where its files are, else `self` (needs no files)
AUTO_PROBE, FALLBACK_PROBE, FALLBACK_PROBE_LIMIT = "general-probe", "self", 50


def probe_suite(name: str, data_root: str | Path | None, limit: int | None) -> tuple[Suite, str]:
    """The training monitor's probe suite and a line saying which one and why. `auto`: `general-probe` (the same
    retention score as `general`, on other items) when all its data files are found under the data root, else
    `self` on its first 50 prompts. `limit` caps every task's items; without one, `self` (named or chosen) probes
    50 prompts and any other suite its own counts."""
    from .tasks import resolve_data_root

    why = f"probe suite {name}"
    if name == "auto":
        root = resolve_data_root(data_root)
        missing = load_suite(AUTO_PROBE).missing_files(root)
        if missing:
            name = FALLBACK_PROBE
            why = (f"probe suite self (auto: general-probe's data is not under {root or 'any data root'}: "
                   f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}; "
                   f"`forgetless data pull general-probe --to DIR` and monitor.data_root: DIR give the general probe)")
        else:
            name = AUTO_PROBE
            why = f"probe suite general-probe (auto: its data is under {root})"
    if limit is None and name == FALLBACK_PROBE:
        limit = FALLBACK_PROBE_LIMIT
    return load_suite(name).with_limit(limit), why


def builtin_suites() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_suite(name_or_path: str | Path | Suite) -> Suite:
    """A built-in suite by name (`general`, `self`) or a suite YAML file (a Suite is returned as it is)."""
    if isinstance(name_or_path, Suite):
        return name_or_path
    path = Path(name_or_path)
    if not path.is_file():
        builtin = BUILTIN_DIR / f"{name_or_path}.yaml"
        if not builtin.is_file():
            raise ForgetlessError(
                f"unknown suite {name_or_path!r}: not a file and not a built-in suite ({', '.join(builtin_suites())})"
            )
        path = builtin
    return load_config_file(path, Suite, "suite", "a YAML mapping with name: and tasks:", tags=KIND_NAMES,
                            error=ForgetlessError)
