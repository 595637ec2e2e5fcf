"""Reading records from JSONL / JSON files (with file:line in every error) or from HF dataset ids."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DataError


@dataclass
class Record:
    """One example as read from disk, with where it came from (for error messages)."""

    data: dict[str, Any]
    source: str
    line: int  # 1-based line (JSONL) or index + 1 (JSON array, HF dataset)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


def open_text(path: Path):
    """Open a text file for reading, gunzipping .gz files."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def is_hf_id(spec: str) -> bool:
    """`hf:owner/name`, or `owner/name` that is not a local path and has no file suffix."""
    if spec.startswith("hf:"):
        return True
    p = Path(spec)
    return not p.exists() and spec.count("/") == 1 and not p.suffix and not spec.startswith((".", "/", "~"))


def read_file(path: str | Path) -> list[Record]:
    """Read a .jsonl / .json (array of objects, or {"data": [...]}) file, optionally gzipped."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    records: list[Record] = []
    if name.endswith(".jsonl") or name.endswith(".ndjson"):
        with open_text(path) as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{i}: malformed JSON line ({e.msg} at column {e.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(f"{path}:{i}: expected a JSON object, got {type(obj).__name__}")
                records.append(Record(obj, str(path), i))
    elif name.endswith(".json"):
        with open_text(path) as f:
            text = f.read()
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: a .json data file holds an array of objects (or {{'data': [...]}})")
        for i, item in enumerate(obj, start=1):
            if not isinstance(item, dict):
                raise DataError(f"{path}: item {i}: expected a JSON object, got {type(item).__name__}")
            records.append(Record(item, str(path), i))
    else:
        raise DataError(f"{path}: unsupported data file type; use .jsonl, .json (optionally .gz), or hf:<dataset id>")
    return records


def require_hub(spec: str) -> None:
    """Fail at once, not after the datasets library's retries, when the hub cannot be reached."""
    from ..models.pull import hub_unreachable_reason

    reason = hub_unreachable_reason(timeout=3.0)
    if reason:
        raise DataError(
            f"{spec}: could not load the HF dataset: the hub is unreachable ({reason}). "
            "Offline? Download it once elsewhere and point the recipe at a local .jsonl file."
        )


def read_hf(spec: str, split: str) -> list[Record]:
    """Load an HF dataset id (needs the hub); fails fast with a clear message when offline."""
    name = spec[3:] if spec.startswith("hf:") else spec
    require_hub(spec)
    try:
        import datasets

        ds = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any failure here means the same thing to the user
        raise DataError(
            f"{spec}: could not load the HF dataset (split {split!r}): {type(e).__name__}: {e}. "
            "Offline? Download it once elsewhere and point data.train at a local .jsonl file."
        ) from None
    return [Record(dict(row), f"hf:{name}[{split}]", i) for i, row in enumerate(ds, start=1)]


def load_records(specs: str | list[str], split: str = "train") -> list[Record]:
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: list[Record] = []
    for spec in specs:
        out.extend(read_hf(spec, split) if is_hf_id(spec) else read_file(spec))
    return out
