"""The check's report (CheckReport) and its timing and fingerprint helpers."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class CheckReport:
    """What `check_data` / `cheap_checks` found. Sections that did not run hold {"skipped": reason}."""

    files: list[str]
    format: str
    records: int
    valid: int
    schema: dict[str, Any]
    exact_duplicates: dict[str, Any]
    near_duplicates: dict[str, Any]
    contradictions: dict[str, Any]
    degenerate: dict[str, Any]
    length: dict[str, Any]
    contamination: dict[str, Any]
    diversity: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    # where -> (reason, kept where or None, detail): what fix_data removes; not part of the JSON
    removal_plan: dict[str, tuple[str, str | None, str]] = field(default_factory=dict, repr=False)
    contradiction_locations: list[list[str]] = field(default_factory=list, repr=False)
    fingerprints: dict[str, list[int]] = field(default_factory=dict, repr=False)

    @property
    def problems(self) -> dict[str, int]:
        """Counts per check: records affected (contradictions: prompts with conflicting answers)."""
        return {
            "schema": self.schema.get("bad", 0),
            "exact_duplicates": self.exact_duplicates.get("duplicates", 0),
            "near_duplicates": self.near_duplicates.get("duplicates", 0),
            "contradictions": self.contradictions.get("groups", 0),
            "degenerate": self.degenerate.get("count", 0),
            "truncated": self.length.get("over_max_length", 0),
            "contaminated": self.contamination.get("contaminated", 0),
        }

    @property
    def total_problems(self) -> int:
        return sum(self.problems.values())

    def to_dict(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "format": self.format,
            "records": self.records,
            "valid": self.valid,
            "problems": self.problems,
            "total_problems": self.total_problems,
            "schema": self.schema,
            "exact_duplicates": self.exact_duplicates,
            "near_duplicates": self.near_duplicates,
            "contradictions": self.contradictions,
            "degenerate": self.degenerate,
            "length": self.length,
            "contamination": self.contamination,
            "diversity": self.diversity,
            "settings": self.settings,
            "timings": self.timings,
        }


def skipped(reason: str) -> dict[str, Any]:
    return {"skipped": reason}


class Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(self.timings.get(name, 0.0) + now - self._t, 3)
        self._t = now


def fingerprints(files: list[str]) -> dict[str, list[int]]:
    out = {}
    for f in files:
        p = Path(f).expanduser()
        if p.is_file():
            st = p.stat()
            out[str(p)] = [st.st_size, st.st_mtime_ns]
    return out
