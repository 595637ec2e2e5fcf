"""Reading records from JSONL / JSON files (with file:line in every error) or from HF dataset ids."""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator
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
    """Open a text file for reading, gunzipping .gz files; a UTF-8 byte-order mark (Windows tools write one) is
    dropped."""
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig")
    return open(path, encoding="utf-8-sig")


def _open_bytes(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def file_problem(path: Path) -> str | None:
    """Why `path` holds no readable records at all, or None: empty, binary, or not UTF-8 text."""
    try:
        with _open_bytes(path) as f:
            head = f.read(8192)
    except (OSError, EOFError) as e:  # a .gz that is not gzip
        return f"cannot be read: {e}"
    if not head.strip() or head.strip() == b"\xef\xbb\xbf":
        return "the file is empty (no records)"
    if b"\x00" in head:
        return "this is a binary file, not UTF-8 JSON text (it has NUL bytes)"
    first = head.split(b"\n", 1)[0]  # a bad byte further on is reported with its line
    try:
        first.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(first) - 3 or b"\n" in head:  # not just a character cut at the end of the sample
            return f"this is not UTF-8 text (byte {e.start} is {first[e.start:e.start + 1]!r}); save it as UTF-8"
    return None


def iter_lines(path: Path) -> Iterator[tuple[int, str | None, str | None]]:
    """(line number, text, None) per line, or (line number, None, why) for a line that is not UTF-8; a
    byte-order mark at the start is dropped."""
    with _open_bytes(path) as f:
        for i, raw in enumerate(f, start=1):
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                yield i, raw.decode("utf-8"), None
            except UnicodeDecodeError as e:
                yield i, None, (f"not UTF-8 text (byte {e.start} of the line is {raw[e.start:e.start + 1]!r}); "
                                "save the file as UTF-8")


def json_array_text(path: Path) -> list[Any] | None:
    """A .jsonl file that holds one JSON array instead of one object per line (a .json saved under the wrong
    name): its items, or None when the file is not that."""
    with _open_bytes(path) as f:
        start = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not start.startswith(b"["):
        return None
    try:
        with open_text(path) as f:
            obj = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return obj if isinstance(obj, list) else None


def is_hf_id(spec: str) -> bool:
    """`hf:owner/name`, or `owner/name` that is not a local path and has no file suffix."""
    if spec.startswith("hf:"):
        return True
    p = Path(spec)
    return not p.exists() and spec.count("/") == 1 and not p.suffix and not spec.startswith((".", "/", "~"))


@dataclass
class BadLine:
    """A line (or JSON array item) that is not a usable record, with the raw text when there is one."""

    where: str
    error: str
    raw: str | None = None
    kind: str = "malformed_json"  # or "schema" (valid JSON, but not an object)
    strict: str | None = None  # what strict reading raises, where it says more than "where: error"

    @property
    def message(self) -> str:
        return self.strict or f"{self.where}: {self.error}"


def iter_json_file(path: str | Path) -> Iterator[tuple[int, Any, BadLine | None]]:
    """Yield (line, value, None) per JSON value, or (line, None, BadLine) per malformed line; never stops early.

    .jsonl/.ndjson (optionally .gz): one value per non-blank line. .json: an array, or {"data": [...]}; a
    malformed .json file is one BadLine (a single document cannot be read past its error).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    if not plain_name(path).endswith((".jsonl", ".ndjson", ".json")):
        raise DataError(f"{path}: unsupported data file type; use .jsonl, .json (optionally .gz), or hf:<dataset id>")
    problem = file_problem(path)
    if problem:  # empty, binary or not UTF-8: one finding for the whole file
        yield 1, None, BadLine(f"{path}:1", problem, strict=f"{path}: {problem}",
                               kind="schema" if problem.startswith("the file is empty") else "malformed_json")
        return
    if not name_is_json_array(path):
        for i, line, bad in iter_lines(path):
            if bad:
                yield i, None, BadLine(f"{path}:{i}", bad)
                continue
            assert line is not None  # iter_lines gives no line only with a reason (bad)
            if not line.strip():
                continue
            try:
                yield i, json.loads(line), None
            except json.JSONDecodeError as e:
                raw = line.rstrip("\n")
                yield i, None, BadLine(f"{path}:{i}", f"malformed JSON line ({e.msg} at column {e.colno})", raw)
    else:
        try:
            with open_text(path) as f:
                text = f.read()
        except UnicodeDecodeError as e:
            msg = f"not UTF-8 text (byte {e.start}); save the file as UTF-8"
            yield 1, None, BadLine(f"{path}:1", msg, strict=f"{path}: {msg}")
            return
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            msg = f"malformed JSON ({e.msg} at column {e.colno})"
            yield e.lineno, None, BadLine(f"{path}:{e.lineno}", f"{msg}; the rest of this file cannot be read",
                                          strict=f"{path}:{e.lineno}: {msg}")
            return
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            msg = "a .json data file holds an array of objects (or {'data': [...]})"
            yield 1, None, BadLine(f"{path}:1", msg, strict=f"{path}: {msg}")
            return
        for i, item in enumerate(obj, start=1):
            yield i, item, None


def read_file(path: str | Path, bad: list[BadLine] | None = None) -> list[Record]:
    """Read a .jsonl / .json (array of objects, or {"data": [...]}) file, optionally gzipped. A UTF-8 byte-order
    mark is accepted; so is a .jsonl file holding one JSON array.

    Strict by default: the first malformed line, non-object value, binary or non-UTF-8 file is an error naming
    the file and line (an empty file has no records). Tolerant with `bad` (a list): every such problem is added
    to it and reading goes on (`forgetless data check` reads this way, to report them all)."""
    path = Path(path).expanduser()
    records: list[Record] = []
    for line, value, problem in iter_json_file(path):
        if problem is None and not isinstance(value, dict):
            msg = f"expected a JSON object, got {type(value).__name__}"
            item = name_is_json_array(path)
            problem = BadLine(f"{path}:{line}", msg, json.dumps(value, ensure_ascii=False), kind="schema",
                              strict=f"{path}: item {line}: {msg}" if item else None)
        if problem is None:
            records.append(Record(value, str(path), line))
        elif bad is not None:
            bad.append(problem)
        elif not problem.error.startswith("the file is empty"):
            raise DataError(problem.message)
    return records


def plain_name(path: Path) -> str:
    """The file's name without a .gz suffix."""
    return path.name[:-3] if path.name.endswith(".gz") else path.name


def name_is_json_array(path: Path) -> bool:
    """Whether iter_json_file reads `path` as one JSON document (positions are array items, not lines): a .json
    file, or one JSON array under a .jsonl name."""
    return plain_name(path).endswith(".json") or json_array_text(path) is not None


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


def load_records(specs: str | list[str], split: str = "train", bad: list[BadLine] | None = None) -> list[Record]:
    """The records of local files and HF dataset ids, in order; `bad`: read tolerantly (see read_file)."""
    specs = [specs] if isinstance(specs, str) else list(specs)
    out: list[Record] = []
    for spec in specs:
        out.extend(read_hf(spec, split) if is_hf_id(spec) else read_file(spec, bad))
    return out
