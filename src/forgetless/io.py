"""Atomic file and directory writes: a crash never leaves a half-written file behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from . import faults
from .errors import OutputExistsError


def forgetless_home() -> Path:
    """$FORGETLESS_HOME (default ~/.cache/forgetless): model cache, evaluation and probe caches."""
    return Path(os.environ.get("FORGETLESS_HOME") or Path.home() / ".cache" / "forgetless").expanduser()


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (os.umask both sets and reads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike) -> None:
    """Give a file or folder made private (mkstemp / mkdtemp: 0600 / 0700) the mode a plain open() or mkdir
    would have given it (0666 / 0777 less the umask), so what a run publishes is readable as its folder is."""
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~_umask())


def plain_modes(root: str | os.PathLike) -> None:
    """plain_mode on a folder forgetless just wrote and everything in it (links left alone). safetensors >= 0.8
    writes every file 0600 whatever the umask (safetensors/safetensors#782), so a model saved by
    save_pretrained is unreadable to a colleague or a serving user until this runs."""
    mask = _umask()
    for dirpath, dirnames, filenames in os.walk(os.fspath(root)):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            f = os.path.join(dirpath, name)
            if not os.path.islink(f):
                os.chmod(f, 0o666 & ~mask)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]


@contextlib.contextmanager
def _replacing(path: Path) -> Iterator[tuple[int, str]]:
    """A temporary file beside `path` (its open descriptor and name) that replaces `path` when the block ends
    without error, with a plain file's mode (plain_mode); on any error it is removed and `path` is untouched."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        yield fd, tmp
        plain_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def save_safetensors(tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file through a temporary file beside `path`, renamed over it with a plain file's
    mode (plain_mode): a crash leaves no half-written file and the result is as readable as its folder."""
    from safetensors.torch import save_file

    with _replacing(Path(path)) as (fd, tmp):
        os.close(fd)  # safetensors writes the file by its name
        save_file(tensors, tmp, metadata=metadata)
        faults.write(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same directory, then rename over it.

    The file gets the mode a plain open() would give it (0666 less the umask), not mkstemp's private 0600."""
    with _replacing(Path(path)) as (fd, _), os.fdopen(fd, "wb") as f:
        f.write(data)
        faults.write(path)
        f.flush()
        os.fsync(f.fileno())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically (atomic_write_bytes)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside `path`; on success it is renamed to `path`.

    On any exception the temporary directory is removed and `path` is untouched. An existing `path` is
    replaced only when `overwrite` is true (the old one is removed after the new one is complete).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        faults.write(path)
        plain_modes(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


def append_jsonl(path: str | os.PathLike, record: dict[str, Any]) -> None:
    """Append one JSON line and flush it, so a killed run keeps every record written so far."""
    faults.write(path)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()
