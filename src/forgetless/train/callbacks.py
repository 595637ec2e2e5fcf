"""Trainer callbacks: metrics.jsonl, the rich progress bar, early stopping, complete-checkpoint markers."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from ..distributed import is_main
from ..io import append_jsonl

COMPLETE_MARKER = "FORGETLESS_COMPLETE"


class MetricsLogger(TrainerCallback):
    """Appends one JSON line per log event: step, loss, lr, grad norm, tokens/s (and eval results).
    With several processes the Trainer logs numbers gathered over all of them; only rank 0 writes."""

    def __init__(self, path: Path):
        self.path = path
        self._t = time.perf_counter()
        self._tokens = None
        self.last: dict[str, Any] = {}
        self.eval_step: int | None = None  # the step of the validation loss in `last`

    def on_train_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()
        self._tokens = state.num_input_tokens_seen

    def on_log(self, args, state, control, logs=None, **kw):
        logs = dict(logs or {})
        now = time.perf_counter()
        rec: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if "loss" in logs:
            rec["loss"] = logs["loss"]
            rec["lr"] = logs.get("learning_rate")
            rec["grad_norm"] = logs.get("grad_norm")
            tokens = state.num_input_tokens_seen
            if self._tokens is not None and now > self._t:
                rec["tokens_per_s"] = round((tokens - self._tokens) / (now - self._t), 1)
            rec["tokens_seen"] = tokens
            self._t, self._tokens = now, tokens
        for k, v in logs.items():
            if k.startswith("eval_") or k.startswith("fl_"):
                rec[k] = v
        if "eval_loss" in logs:
            self.eval_step = state.global_step
        if len(rec) > 2:
            if is_main():  # every rank logs the same (gathered) numbers; rank 0 writes them
                append_jsonl(self.path, rec)
            self.last.update(rec)


def progress_info(last: dict[str, Any], eval_step: int | None, step: int) -> str:
    """The progress bar's text: the latest loss and tokens/s, and the latest validation loss with the step it
    was measured at when that is not the current step (the final validation runs after the bar closes)."""
    parts = []
    if "loss" in last:
        parts.append(f"loss {last['loss']:.4f}")
    if "tokens_per_s" in last:
        parts.append(f"{last['tokens_per_s']:.0f} tok/s")
    if "eval_loss" in last:
        at = f" (step {eval_step})" if eval_step is not None and eval_step != step else ""
        parts.append(f"val {last['eval_loss']:.4f}{at}")
    return "  ".join(parts)


class RichProgress(TrainerCallback):
    """A rich progress bar with loss and tokens/s, replacing the Trainer's tqdm bar; in a log file (stderr not
    a terminal) a plain line at most every 30 s instead (forgetless.progress)."""

    def __init__(self, metrics: MetricsLogger, enabled: bool = True):
        self.metrics = metrics
        self.enabled = enabled
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kw):
        if not self.enabled:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn

        from ..progress import bar

        self.progress = bar(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            label="train",
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=state.max_steps, completed=state.global_step, info="")

    def on_step_end(self, args, state, control, **kw):
        if self.progress is None:
            return
        info = progress_info(self.metrics.last, self.metrics.eval_step, state.global_step)
        self.progress.update(self.task, completed=state.global_step, info=info)

    def on_train_end(self, args, state, control, **kw):
        if self.progress is not None:
            self.progress.update(self.task, completed=state.global_step)
            self.progress.stop()
            self.progress = None


class EarlyStopping(TrainerCallback, ExportableState):
    """Stop when the validation loss has not improved by `min_delta` for `patience` evaluations.

    Its counter and best loss are saved in every checkpoint's trainer_state.json (the Trainer's
    `stateful_callbacks`) and restored by `restore()` on resume, so a resumed run stops where the
    uninterrupted run would have."""

    def __init__(self, patience: int, min_delta: float = 0.0):
        self.patience = patience
        self.min_delta = min_delta
        self.best: float | None = None
        self.bad = 0
        self.stopped_at: int | None = None

    def state(self) -> dict[str, Any]:
        return {"args": {"patience": self.patience, "min_delta": self.min_delta},
                "attributes": {"best": self.best, "bad": self.bad}}

    def restore(self, checkpoint: Path) -> None:
        """Take the counter and best loss saved in `checkpoint`/trainer_state.json, if there are any."""
        path = Path(checkpoint) / "trainer_state.json"
        if not path.is_file():
            return
        saved = json.loads(path.read_text()).get("stateful_callbacks", {}).get(type(self).__name__)
        if isinstance(saved, list):  # the Trainer stores a list when several callbacks share a class name
            saved = saved[0]
        for k, v in (saved or {}).get("attributes", {}).items():
            if k in ("best", "bad"):
                setattr(self, k, v)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if self.best is None or loss < self.best - self.min_delta:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                control.should_training_stop = True
                self.stopped_at = state.global_step


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it; resume uses only marked ones."""

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE_MARKER).write_text(str(state.global_step))


def latest_complete_checkpoint(ckpt_root: Path) -> Path | None:
    done = [p for p in ckpt_root.glob("checkpoint-*") if (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[-1]), default=None)
