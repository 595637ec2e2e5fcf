"""`forgetless data pull SUITE --to DIR`: write the files a suite reads from the public datasets they come from.

Every built-in task with data names its public source under `data.source`: a Hugging Face dataset id, a
config, a split, and how hub rows become the local file (`convert`). Pulling loads each through `datasets`
(so it needs the hub, or a `datasets` cache) and writes the file at the task's `data.path` under DIR, in the
layout the task reads; then `--data-root DIR` (or FORGETLESS_DATA=DIR) points evaluation at it.

Converters (hub rows -> local file):
  jsonl     the rows as JSON lines (gzipped when the path ends in .gz), fields as the hub has them
  arc       ai2_arc rows -> {id, question, choices: [texts], gold: index of answerKey among the labels}
  piqa      rows without `label` -> the .jsonl, and the labels one per line -> data.labels_path
  flores    facebook/flores pair rows -> {id, src, ref, src_lang, tgt_lang} (the config names the two languages)
  text      the rows' `text` fields concatenated -> a .txt file (WikiText keeps its own line breaks)

`verified: false` on a source means its mapping (id, config, split and field layout) could not be checked
against the hub from where it was written (no hub access): the field layouts were written to match the
local files, and the test suite checks the writing and reading path with local stand-in datasets.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..errors import DataError, ForgetlessError
from ..io import atomic_write_bytes, atomic_write_text
from .suite import Suite

FLORES_LANGS = {"eng_Latn": "en", "deu_Latn": "de", "fra_Latn": "fr", "zho_Hans": "zh"}


def _jsonl(rows: Iterable[dict[str, Any]]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def _write(path: Path, text: str) -> None:
    """Atomic write; gzipped (deterministic header) when the name ends in .gz."""
    if path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            gz.write(text.encode("utf-8"))
        atomic_write_bytes(path, buf.getvalue())
        return
    atomic_write_text(path, text)


def _arc(rows: list[dict[str, Any]], task: Any, src: Any) -> dict[str, str]:
    out = []
    for i, r in enumerate(rows):
        labels, texts = r["choices"]["label"], r["choices"]["text"]
        if r["answerKey"] not in labels:
            raise DataError(f"hf:{src.hub} row {i}: answerKey {r['answerKey']!r} is not one of the labels {labels}")
        out.append({"id": r["id"], "question": r["question"], "choices": list(texts),
                    "gold": labels.index(r["answerKey"])})
    return {task.data.path: _jsonl(out)}


def _piqa(rows: list[dict[str, Any]], task: Any, src: Any) -> dict[str, str]:
    if not task.data.labels_path:
        raise ForgetlessError(f"task {task.name}: convert: piqa needs data.labels_path (where the labels go)")
    return {task.data.path: _jsonl({k: v for k, v in r.items() if k != "label"} for r in rows),
            task.data.labels_path: "".join(f"{int(r['label'])}\n" for r in rows)}


def _flores(rows: list[dict[str, Any]], task: Any, src: Any) -> dict[str, str]:
    try:
        a, b = (src.config or "").split("-")
        sa, sb = FLORES_LANGS[a], FLORES_LANGS[b]
    except (ValueError, KeyError):
        raise ForgetlessError(f"task {task.name}: data.source.config {src.config!r}: expected a Flores pair such as "
                              f"eng_Latn-deu_Latn ({', '.join(FLORES_LANGS)})") from None
    out = [{"id": f"flores200-{src.split}-{sa}{sb}-{i}", "src": r[f"sentence_{a}"], "ref": r[f"sentence_{b}"],
            "src_lang": sa, "tgt_lang": sb} for i, r in enumerate(rows)]
    return {task.data.path: _jsonl(out)}


def _text(rows: list[dict[str, Any]], task: Any, src: Any) -> dict[str, str]:
    return {task.data.path: "".join(r["text"] if r["text"].endswith("\n") else r["text"] + "\n" for r in rows)}


CONVERTERS: dict[str, Callable[[list[dict[str, Any]], Any, Any], dict[str, str]]] = {
    "jsonl": lambda rows, task, src: {task.data.path: _jsonl(rows)},
    "arc": _arc,
    "piqa": _piqa,
    "flores": _flores,
    "text": _text,
}


def _default_loader(hub: str, config: str | None, split: str) -> Iterable[dict[str, Any]]:
    import datasets

    return datasets.load_dataset(hub, config, split=split)


def pull_suite(suite: Suite, to: str | Path, *, tasks: list[str] | None = None, overwrite: bool = False,
               loader: Callable[[str, str | None, str], Iterable[dict[str, Any]]] | None = None,
               check_hub: bool = True) -> list[dict[str, Any]]:
    """Write every file the suite's tasks read (those with a `data.source`) under `to`. Returns one entry per
    task: its files, the source and whether the mapping was verified. Existing files are kept unless
    `overwrite`. `loader(hub, config, split)` defaults to `datasets.load_dataset`."""
    to = Path(to)
    s = suite.only(tasks)
    todo = [t for t in s.tasks if t.data is not None and t.data.source is not None]
    skipped = [t.name for t in s.tasks if t.data is not None and t.data.source is None and t.data.path]
    if not todo:
        raise ForgetlessError(f"suite {suite.name}: no task names a public source (data.source) to pull"
                              + (f"; without one: {', '.join(skipped)}" if skipped else ""))
    if loader is None:
        loader = _default_loader
        if check_hub:
            from ..data.loading import require_hub

            require_hub(f"forgetless data pull {suite.name}")
    report = []
    for t in todo:
        data = t.data
        assert data is not None and data.source is not None  # todo holds only the tasks with a data.source
        src = data.source
        paths = [p for p in (data.path, data.labels_path) if p]
        if any(Path(p).is_absolute() for p in paths):
            raise ForgetlessError(f"task {t.name}: data.path {data.path!r} is absolute; pull writes paths "
                                  "relative to --to")
        entry: dict[str, Any] = {"task": t.name, "source": src.model_dump(), "files": [str(to / p) for p in paths]}
        if not overwrite and all((to / p).is_file() for p in paths):
            report.append({**entry, "status": "present"})
            continue
        try:
            rows = [dict(r) for r in loader(src.hub, src.config, src.split)]
        except Exception as e:  # noqa: BLE001 - any failure of the hub or datasets means the same to the user
            raise DataError(f"task {t.name}: cannot load hf:{src.hub} ({src.config or 'default'}, split "
                            f"{src.split}): {e}"
                            + ("" if src.verified
                               else " (this hub mapping could not be verified when it was written)")) from None
        if not rows:
            raise DataError(f"task {t.name}: hf:{src.hub} ({src.config or 'default'}, {src.split}) is empty")
        try:
            files = CONVERTERS[src.convert](rows, t, src)
        except KeyError as e:
            raise DataError(f"task {t.name}: hf:{src.hub} rows lack the field {e} that convert: {src.convert} needs"
                            + ("" if src.verified else " (mapping not verified against the hub)")) from None
        for rel, text in files.items():
            _write(to / rel, text)
        report.append({**entry, "status": "written", "rows": len(rows)})
    return report
