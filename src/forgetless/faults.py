"""Fault injection for the reliability tests: kill the process, or fail a write as a full disk would, at a
named point. Honoured only when $FORGETLESS_FAULT is set; otherwise every call here is a no-op.

FORGETLESS_FAULT holds one or more comma-separated specs:

  kill:<point>      SIGKILL this process when it reaches <point> (no cleanup, no atexit: as a power cut or OOM kill)
  enospc:<name>     the write of a file or directory named <name> fails with OSError ENOSPC (disk full)

Points of a training run (see docs/reliability.md): `step@N` (optimizer step N done, before its checkpoint),
`written@N` (checkpoint-N written, not yet marked complete), `checkpoint@N` (checkpoint-N written and marked
complete), `final_save` (inside the final model's
temporary directory, half written), `summary` (before summary.json), `report` (while writing report.html).
Writes named for `enospc:` are the atomic writes of forgetless.io: `final`, `summary.json`, `metrics.jsonl`, ...
"""

from __future__ import annotations

import errno
import os
import signal
import sys
from pathlib import Path

ENV = "FORGETLESS_FAULT"


def _specs() -> list[tuple[str, str]]:
    raw = os.environ.get(ENV, "")
    out = []
    for part in raw.split(","):
        kind, sep, arg = part.strip().partition(":")
        if sep:
            out.append((kind, arg))
    return out


def point(name: str) -> None:
    """A named point of the run: with FORGETLESS_FAULT=kill:<name>, the process is SIGKILLed here."""
    if ENV not in os.environ:
        return
    if ("kill", name) in _specs():
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def write(path: str | os.PathLike) -> None:
    """Before writing `path`: with FORGETLESS_FAULT=enospc:<its name>, fail as a full disk does."""
    if ENV not in os.environ:
        return
    if ("enospc", Path(path).name) in _specs():
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
