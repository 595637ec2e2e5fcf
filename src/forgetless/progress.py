"""Progress for long work that shows in a terminal and in a log file.

In a terminal (stderr is a TTY) forgetless draws rich progress bars. Under CI, nohup, a scheduler or
`2> log`, a bar draws nothing for minutes, so there `bar()` returns `PlainProgress`: the same small API
(add_task, advance, update, start, stop, a context manager) printing one plain line per task at most every
`FORGETLESS_PROGRESS_INTERVAL` seconds (30 by default), plus a line when a task starts and when it ends:

    [08:41:07] train 12/60 (20%)  loss 2.3100  210 tok/s  elapsed 1m02s  ETA 4m08s

No ANSI codes. Everything goes to stderr, so stdout stays for results (`--json`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

DEFAULT_INTERVAL_S = 30.0


def interval_s() -> float:
    try:
        return float(os.environ.get("FORGETLESS_PROGRESS_INTERVAL", DEFAULT_INTERVAL_S))
    except ValueError:
        return DEFAULT_INTERVAL_S


def stderr_is_terminal() -> bool:
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def duration(seconds: float) -> str:
    """90 -> '1m30s'; 4000 -> '1h06m'."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0.0
    fields: dict[str, Any] = field(default_factory=dict)
    started: float = 0.0
    start_completed: float = 0.0
    last_print: float = 0.0
    finished: bool = False


class PlainProgress:
    """Plain progress lines for logs; see the module docstring. `label` prefixes every line ("train", "eval")."""

    def __init__(self, label: str = "", *, disable: bool = False, interval: float | None = None,
                 stream: IO[str] | None = None, info_field: str | None = "info"):
        self.label = label
        self.disable = disable
        self.interval = interval_s() if interval is None else interval
        self.stream = stream
        self.info_field = info_field
        self.tasks: dict[int, _Task] = {}

    # rich.progress.Progress's API, the parts forgetless uses
    def start(self) -> None:
        pass

    def stop(self) -> None:
        for tid, t in self.tasks.items():
            if not t.finished and t.completed > t.start_completed:
                self._print(tid, final=True)

    def __enter__(self) -> PlainProgress:
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **fields: Any) -> int:
        tid = len(self.tasks)
        now = time.monotonic()
        self.tasks[tid] = _Task(description, total, completed, dict(fields), now, completed, now)
        self._print(tid, first=True)
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        t = self.tasks[task_id]
        self.update(task_id, completed=t.completed + advance)

    def update(self, task_id: int, *, completed: float | None = None, total: float | None = None,
               description: str | None = None, **fields: Any) -> None:
        t = self.tasks[task_id]
        if completed is not None:
            t.completed = completed
        if total is not None:
            t.total = total
        if description is not None:
            t.description = description
        t.fields.update(fields)
        if t.finished:
            return
        if t.total is not None and t.completed >= t.total:
            self._print(task_id, final=True)
        elif time.monotonic() - t.last_print >= self.interval:
            self._print(task_id)

    # the line
    def line(self, task_id: int, final: bool = False, first: bool = False) -> str:
        t = self.tasks[task_id]
        now = time.monotonic()
        head = f"{self.label} {t.description}".strip() if t.description != self.label else self.label
        parts = [f"[{time.strftime('%H:%M:%S')}] {head}"]
        if t.total:
            parts[0] += f" {_num(t.completed)}/{_num(t.total)} ({100 * t.completed / t.total:.0f}%)"
        elif t.completed:
            parts[0] += f" {_num(t.completed)}"
        info = t.fields.get(self.info_field) if self.info_field else None
        if info:
            parts.append(str(info))
        if first:
            return "  ".join(parts) + "  started"
        elapsed = now - t.started
        parts.append(f"elapsed {duration(elapsed)}")
        done = t.completed - t.start_completed
        if final:
            parts.append("done")
        elif t.total and done > 0:
            parts.append(f"ETA {duration(elapsed / done * (t.total - t.completed))}")
        return "  ".join(parts)

    def _print(self, task_id: int, final: bool = False, first: bool = False) -> None:
        t = self.tasks[task_id]
        t.last_print = time.monotonic()
        t.finished = t.finished or final
        if self.disable:
            return
        stream = self.stream or sys.stderr
        print(self.line(task_id, final=final, first=first), file=stream, flush=True)


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:.1f}"


def bar(*columns: Any, label: str = "", transient: bool = False, disable: bool = False,
        info_field: str | None = "info") -> Any:
    """A rich Progress on stderr when stderr is a terminal, else PlainProgress (lines at most every 30 s)."""
    if not stderr_is_terminal():
        return PlainProgress(label, disable=disable, info_field=info_field)
    from rich.console import Console
    from rich.progress import Progress

    return Progress(*columns, transient=transient, disable=disable, console=Console(stderr=True))


@contextlib.contextmanager
def heartbeat(msg: str, *, quiet: bool = False, interval: float | None = None,
              stream: IO[str] | None = None) -> Iterator[None]:
    """For one long step with no count (a model pull, a conversion): in a terminal a rich spinner; in a log a
    line when it starts and one every `interval` seconds (30 by default) while it runs."""
    if quiet:
        yield
        return
    if stderr_is_terminal() and stream is None:
        from rich.console import Console

        with Console(stderr=True).status(msg + " ..."):
            yield
        return
    out = stream or sys.stderr
    every = interval_s() if interval is None else interval
    t0 = time.monotonic()
    print(f"[{time.strftime('%H:%M:%S')}] {msg} ...", file=out, flush=True)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every):
            print(f"[{time.strftime('%H:%M:%S')}] {msg} ... still running, elapsed {duration(time.monotonic() - t0)}",
                  file=out, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
