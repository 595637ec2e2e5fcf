"""fix_data: a cleaned copy of the data, with a log of every removed record and why."""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...config import DataConfig
from ...errors import DataError
from ...io import atomic_write_text
from ..loading import is_hf_id, iter_json_file
from .common import REASONS
from .report import CheckReport, fingerprints
from .run import check_data


@dataclass
class FixResult:
    """What `fix_data` wrote."""

    out: str
    removed_log: str
    kept: int
    removed: int
    by_reason: dict[str, int]
    contradictions_left: list[list[str]]

    def to_dict(self) -> dict[str, Any]:
        return {"out": self.out, "removed_log": self.removed_log, "kept": self.kept, "removed": self.removed,
                "by_reason": self.by_reason, "contradictions_left": self.contradictions_left}


def removed_log_path(out_path: str | Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.name + ".removed.jsonl")


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def fix_data(
    files: str | list[str],
    cfg: DataConfig,
    out_path: str | Path,
    report: CheckReport | None = None,
    *,
    overwrite: bool = False,
    against: dict[str, list[str]] | None = None,
    near_dup_threshold: float = 0.8,
) -> FixResult:
    """Write a cleaned JSONL copy of `files` to `out_path`, and `<out>.removed.jsonl` listing every removal.

    Removed: malformed/invalid records, contaminated and empty/degenerate examples, and exact and near
    duplicates (the first occurrence is kept). Contradictions are left in place and returned for the user.
    The inputs are never modified; `out_path` must not be an input, nor exist unless `overwrite`.
    `report` is the `check_data` report for the same files (checked again here when None).
    """
    files = [files] if isinstance(files, str) else list(files)
    out = Path(out_path).expanduser()
    log = removed_log_path(out)
    if not out.name.endswith((".jsonl", ".ndjson")):
        raise DataError(f"{out}: the cleaned copy is JSONL; give it a .jsonl name (no .gz)")
    for f in files:
        if is_hf_id(f):
            raise DataError(f"{f}: --fix works on local files only")
        for target in (out, log):
            if _same_file(target, Path(f).expanduser()):
                raise DataError(f"{target}: refusing to write over the input file {f}; choose another output path")
    for target in (out, log):
        if target.exists() and not overwrite:
            raise DataError(f"{target} already exists; pass overwrite=True (--overwrite) to replace it")
    if report is None:
        report = check_data(files, cfg, against=against, near_dup_threshold=near_dup_threshold)
    elif report.fingerprints != fingerprints(files):
        raise DataError("the data files changed (or differ) since the check; run the check again before --fix")
    plan = report.removal_plan
    kept_lines: list[str] = []
    log_lines: list[str] = []
    by_reason: Counter[str] = Counter()
    seen: set[str] = set()
    for spec in files:
        source = str(Path(spec).expanduser())
        for line, value, problem in iter_json_file(spec):
            where = problem.where if problem is not None else f"{source}:{line}"
            seen.add(where)
            if where in plan:
                reason, kept, detail = plan[where]
                entry: dict[str, Any] = {"where": where, "reason": reason, "kept": kept, "detail": detail}
                if problem is not None:
                    entry["raw"] = problem.raw
                else:
                    entry["record"] = value
                log_lines.append(json.dumps(entry, ensure_ascii=False))
                by_reason[reason] += 1
            elif problem is None and isinstance(value, dict):
                kept_lines.append(json.dumps(value, ensure_ascii=False))
            else:  # a non-object value the check reported as a schema problem
                raise DataError(f"{where}: not in the check's plan; the files changed since the check")
    missing = set(plan) - seen
    if missing:
        raise DataError(f"{sorted(missing)[0]}: in the check's plan but not in the files; run the check again")
    atomic_write_text(out, "".join(line + "\n" for line in kept_lines))
    atomic_write_text(log, "".join(line + "\n" for line in log_lines))
    return FixResult(
        out=str(out),
        removed_log=str(log),
        kept=len(kept_lines),
        removed=len(log_lines),
        by_reason={r: by_reason[r] for r in REASONS if by_reason[r]},
        contradictions_left=report.contradiction_locations,
    )
