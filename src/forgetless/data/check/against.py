"""Eval sets for contamination: files, built-in suites and registered sources (AGAINST_SOURCES)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ...errors import DataError
from ..loading import iter_json_file, plain_name, read_file


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)


def _task_name(path: Path) -> str:
    name = plain_name(path)
    return name.rsplit(".", 1)[0] if "." in name else name


def _against_file(path: Path) -> list[str]:
    texts = []
    for line, value, problem in iter_json_file(path):
        if problem is not None:
            raise DataError(problem.message)
        text = "\n".join(_strings(value))
        if text.strip():
            texts.append(text)
        elif not isinstance(value, (str, list, dict)):
            raise DataError(f"{path}:{line}: an eval item must be a string or an object, got {type(value).__name__}")
    return texts


#: Extension point: named eval sets (e.g. retention suites) that `load_against` resolves before trying a
#: file. Maps a name to a loader returning the item texts.
AGAINST_SOURCES: dict[str, Callable[[], list[str]]] = {}


def resolve_against(spec: str) -> tuple[str, list[str]]:
    """One `--against` spec -> (task name, item texts). `name=path` names the task; else the file stem."""
    if spec in AGAINST_SOURCES:
        return spec, AGAINST_SOURCES[spec]()
    name, _, rest = spec.partition("=")
    if rest and "/" not in name and not Path(spec).expanduser().exists():
        return name, _against_file(Path(rest).expanduser())
    path = Path(spec).expanduser()
    if not path.is_file():
        known = f" (named sets: {', '.join(sorted(AGAINST_SOURCES))})" if AGAINST_SOURCES else ""
        raise DataError(f"{spec}: eval file not found{known}")
    return _task_name(path), _against_file(path)


def suite_against(spec: str, data_root: str | Path | None = None) -> dict[str, list[str]] | None:
    """A retention suite (built-in name or YAML file) as eval sets, one per task; None if `spec` is no suite.
    Every record of each task's data counts (not only the evaluated sample); self-reference tasks
    contribute their prompts."""
    # here, not at the top: the retention suites import torch, which `forgetless data check` otherwise never needs
    from ...retention.kinds.self_reference import BUILTIN_PROMPTS
    from ...retention.suite import BUILTIN_DIR, load_suite
    from ...retention.tasks import load_rows, resolve_data_root

    if not ((BUILTIN_DIR / f"{spec}.yaml").is_file() or (spec.endswith((".yaml", ".yml")) and Path(spec).is_file())):
        return None
    suite = load_suite(spec)
    root = resolve_data_root(data_root)
    out: dict[str, list[str]] = {}
    for task in suite.tasks:
        if task.kind == "self_reference" and getattr(task, "prompts", "") == "builtin":
            rows = read_file(BUILTIN_PROMPTS)
        elif task.data is not None and (task.data.path or task.data.hf):
            rows = load_rows(task, root)
        else:
            continue
        out[f"{suite.name}/{task.name}"] = [t for t in ("\n".join(_strings(r.data)) for r in rows) if t.strip()]
    return out


def load_against(specs: list[str], data_root: str | Path | None = None) -> dict[str, list[str]]:
    """Eval sets to check for contamination: task name -> item texts (every string field of a record joined,
    strings inside lists such as `choices` included). A spec may be a retention suite (`general`, or a suite
    YAML), which expands to one set per task. Same-named tasks get a numeric suffix."""
    out: dict[str, list[str]] = {}
    for spec in specs:
        suite_sets = suite_against(spec, data_root)
        if suite_sets is not None:
            out.update(suite_sets)
            continue
        name, texts = resolve_against(spec)
        key, k = name, 2
        while key in out:
            key, k = f"{name}_{k}", k + 1
        out[key] = texts
    return out
