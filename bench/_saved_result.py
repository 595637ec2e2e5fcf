"""`--render FILE` for every bench script: a saved result's markdown, re-rendered from its JSON alone.

`load()` reads the saved JSON; a missing file, one that is not JSON or one that holds no JSON object stops the
script with a one-line error naming the file (no traceback). `rerender()` writes the markdown beside it (FILE.md),
atomically, so an interrupted render never leaves half a table.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any


def load(path: Path) -> dict[str, Any]:
    """The saved bench result at `path`, or SystemExit with a message naming the file."""
    if not path.is_file():
        raise SystemExit(f"error: --render {path}: no such file")
    try:
        result = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: --render {path}: not a JSON bench result ({e})") from None
    if not isinstance(result, dict):
        raise SystemExit(f"error: --render {path}: not a bench result (the JSON holds a {type(result).__name__}, "
                         "not an object)")
    return result


def rerender(path: Path, render_md: Callable[[dict[str, Any]], str]) -> Path:
    """Write `render_md(load(path))` to path's .md (atomically); returns the markdown's path."""
    from forgetless.io import atomic_write_text

    md = path.with_suffix(".md")
    atomic_write_text(md, render_md(load(path)))
    return md
