"""JSON on stdout: with `--json` a command's stdout carries the JSON alone. While the command runs, whatever else
is printed to stdout (a library's logger: DeepSpeed's writes there once transformers imports it) goes to stderr;
`print_json` writes to the stdout the command started with."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Iterator
from typing import Any

_stdout: Any = None


@contextlib.contextmanager
def json_mode(on: bool) -> Iterator[None]:
    """Run a command; with `on`, everything printed to stdout meanwhile goes to stderr, except `print_json`."""
    global _stdout
    _stdout = sys.stdout
    try:
        with contextlib.redirect_stdout(sys.stderr) if on else contextlib.nullcontext():
            yield
    finally:
        _stdout = None  # outside a command (a test calling a command's function), print_json prints to stdout


def print_json(obj: Any, indent: int | None = 2, ensure_ascii: bool = True) -> None:
    print(json.dumps(obj, indent=indent, default=str, ensure_ascii=ensure_ascii), file=_stdout or sys.stdout)
