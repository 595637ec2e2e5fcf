"""One writer per directory: a lock file beside it (`.<name>.lock`) naming the process that holds it.

The holder keeps an exclusive `flock` on the file for as long as it runs, and writes its PID, host and
command into it. A second process that wants the same directory:

- finds the flock held: the owner is alive (on this host, or one whose flock reaches us); refused, naming it;
- gets the flock, and the file names a process of this host: that process died without cleaning up (SIGKILL,
  OOM, power loss); the lock is stale and taken over, with a message;
- gets the flock, and the file names another host: its flock may not reach us (NFS), so whether that process
  is alive cannot be known here; refused, with the command that breaks the lock (`--break-lock`).

The lock lives beside the directory, not in it, so `--overwrite` can replace the whole directory while
holding it. Under torchrun only rank 0 takes it (the callers run it through `distributed.on_main`).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from .errors import ForgetlessError


class LockedError(ForgetlessError):
    """Another process holds the directory's lock."""


def lock_path(target: str | os.PathLike) -> Path:
    target = Path(target).expanduser().absolute()
    return target.parent / f".{target.name}.lock"


def break_lock_command() -> str:
    """The command line that was run, with --break-lock: what the user types to take over a foreign lock."""
    argv = sys.argv[1:]
    if Path(sys.argv[0]).name in ("forgetless", "__main__.py") and argv:
        return "forgetless " + " ".join(shlex.quote(a) for a in argv if a != "--break-lock") + " --break-lock"
    return "the same command with --break-lock (break_lock=True)"


def _read(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _describe(info: dict[str, Any]) -> str:
    who = f"pid {info.get('pid', '?')} on host {info.get('host', '?')}"
    if info.get("command"):
        who += f" ({info['command']})"
    if info.get("started"):
        who += f", started {info['started']}"
    return who


class DirLock:
    """Exclusive lock on `target` (a run, sweep or sequence directory, a cache entry). Use as a context manager.

    `what` names the directory in messages ("run directory"). With `wait`, a live holder is waited for
    instead of refused (caches: the second process then reads what the first wrote)."""

    def __init__(self, target: str | os.PathLike, what: str = "directory", *, break_lock: bool = False,
                 wait: bool = False, quiet: bool = False):
        self.target = Path(target)
        self.path = lock_path(target)
        self.what = what
        self.break_lock = break_lock
        self.wait = wait
        self.quiet = quiet
        self._fd: int | None = None

    def _say(self, msg: str) -> None:
        if not self.quiet:
            from rich.console import Console

            Console(stderr=True).print(f"[yellow]{msg}[/yellow]", highlight=False, soft_wrap=True)

    def _open_locked(self) -> int:
        """Open the lock file and take its flock; the file may have been replaced meanwhile: retry then."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
            except BlockingIOError:
                os.close(fd)
                info = _read(self.path)
                raise LockedError(
                    f"{self.what} {self.target} is in use by another forgetless process: {_describe(info)}. "
                    f"Only one process may write it at a time (--overwrite included); wait for that one to finish "
                    f"or stop it. Lock file: {self.path}"
                ) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)  # its holder removed the file while we waited for it: lock the new one

    def acquire(self) -> DirLock:
        fd = self._open_locked()
        try:
            info = _read(self.path)
            host = socket.gethostname()
            if info.get("pid") is not None:
                if info.get("host") not in (None, host) and not self.break_lock:
                    how = f"remove {self.path}" if self.wait else f"{break_lock_command()}  (lock file: {self.path})"
                    raise LockedError(
                        f"{self.what} {self.target} is locked by {_describe(info)}. From here it cannot be told "
                        f"whether that process still runs. If it does not, break the lock: {how}"
                    )
                why = "--break-lock" if self.break_lock else "no longer running"
                self._say(f"taking over the stale lock on {self.target}: {_describe(info)} ({why})")
            record = {"pid": os.getpid(), "host": host, "command": " ".join(sys.argv),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()  # before unlocking: a waiter that got the old file sees it gone and retries
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> DirLock:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
