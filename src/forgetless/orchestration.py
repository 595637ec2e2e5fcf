"""What the orchestrators (`forgetless sweep`, `forgetless continual`) share: a locked output directory that
is claimed, resumed or refused the same way, run names that are safe directory names, and runs that are
trained, resumed or reused from their summary.json."""

from __future__ import annotations

import contextlib
import json
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from . import train as training  # training.train looked up at call time: tests replace forgetless.train.train
from .errors import ForgetlessError
from .lock import DirLock
from .recipe import Recipe, load_recipe
from .report import write_report
from .train.callbacks import latest_complete_checkpoint
from .train.run import refuse_diverged

T = TypeVar("T")
_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=,-]*")


def safe_name(v: str, what: str) -> str:
    """A name that becomes a directory: letters, digits and . _ + = , - (a pydantic validator's body)."""
    if not _SAFE_NAME.fullmatch(v):
        raise ValueError(f"{v!r}: a {what} name is letters, digits and . _ + = , - (it names a directory)")
    return v


def locked(kind: str, break_lock: bool, run: Callable[[Callable[[Path], Any]], T]) -> T:
    """Call `run(lock)`; `lock(out)` locks the output directory (forgetless.lock) until `run` returns."""
    with contextlib.ExitStack() as locks:
        return run(lambda out: locks.enter_context(DirLock(out, kind, break_lock=break_lock)))


def claim_dir(out: Path, state_file: str | tuple[str, ...], kind: str, overwrite: bool) -> bool:
    """Make `out` this orchestrator's directory: empty or absent (created), or one with `state_file` (or any of
    several marker files: resumed), or emptied with `overwrite`; any other directory is refused. Returns whether a
    run is resumed."""
    resumed = False
    markers = (state_file,) if isinstance(state_file, str) else state_file
    if out.exists() and any(out.iterdir()):
        ours = any((out / m).is_file() for m in markers)
        if overwrite and not ours:  # never delete a foreign directory
            raise ForgetlessError(f"--overwrite: {out} is not a {kind} directory (no {' or '.join(markers)}), so it "
                                  "is not deleted; choose another output_dir, or empty it yourself")
        if overwrite:
            shutil.rmtree(out)
        elif not ours:
            raise ForgetlessError(f"{out} exists and is not a {kind} directory; pass --overwrite or choose another "
                                  "output_dir")
        else:
            resumed = True
    out.mkdir(parents=True, exist_ok=True)
    return resumed


def refuse_changed_recipes(runs: Iterable[tuple[str, Path, Recipe]], again: str) -> None:
    """Each (label, run directory, recipe): the recipe.yaml a resumed run wrote must resolve to the same recipe."""
    for label, run_dir, recipe in runs:
        saved = run_dir / "recipe.yaml"
        if saved.is_file() and load_recipe(saved).resolved() != recipe.resolved():
            summary = run_dir / "summary.json"
            finished = summary.is_file() and json.loads(summary.read_text()).get("status") != "diverged"
            if not finished and latest_complete_checkpoint(run_dir / "checkpoints") is None:
                # --overwrite would also delete every finished run beside it: name the one folder instead
                raise ForgetlessError(f"{label}: its recipe changed since {saved} was written; {run_dir} holds "
                                      "neither a finished run nor a complete checkpoint, so deleting that folder "
                                      "loses nothing and trains it afresh with the new recipe (or pass --overwrite "
                                      f"to start {again} again)")
            raise ForgetlessError(f"{label}: its recipe changed since {saved} was written; pass --overwrite to start "
                                  f"{again} again")


def train_or_reuse(recipe: Recipe, run_dir: Path, label: str, quiet: bool) -> dict[str, Any]:
    """The run's summary: read from a finished run (refused if it diverged), else trained, resuming from its
    newest complete checkpoint where an interrupted run left one."""
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary: dict[str, Any] = json.loads(summary_path.read_text())
        refuse_diverged(summary, summary_path, label)
        return summary
    resume = (run_dir / "recipe.yaml").is_file() and (run_dir / "checkpoints").is_dir()
    return training.train(recipe, resume=resume, overwrite=not resume, quiet=quiet, report=write_report).summary
