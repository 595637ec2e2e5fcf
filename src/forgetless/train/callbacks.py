"""Trainer callbacks: metrics.jsonl, the rich progress bar, early stopping, complete-checkpoint markers, the
divergence guard, fault-injection points."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .. import distributed as dist
from .. import faults
from ..distributed import is_main
from ..io import append_jsonl

if TYPE_CHECKING:
    from transformers import Trainer

COMPLETE_MARKER = "FORGETLESS_COMPLETE"
#: in each checkpoint: how many lines metrics.jsonl had when it was written (a resume keeps those, no more)
METRICS_LINES = "forgetless_metrics_lines"
#: in each checkpoint: the training seconds up to it, over every session of the run (absent where a session resumed
#: from a checkpoint written before this file existed: then the total is unknown)
TRAIN_SECONDS = "forgetless_train_seconds"
DIVERGED_MARKER = "FORGETLESS_DIVERGED"


class MetricsLogger(TrainerCallback):
    """Appends one JSON line per log event: step, loss, lr, grad norm, tokens/s (and eval results).
    With several processes the Trainer logs numbers gathered over all of them; only rank 0 writes."""

    def __init__(self, path: Path):
        self.path = path
        self._t = time.perf_counter()
        self._tokens = None
        self.last: dict[str, Any] = {}
        self.eval_step: int | None = None  # the step of the validation loss in `last`
        # where this session started (a resumed run starts at its checkpoint's step): recorded here rather than read
        # from the Trainer's private attributes, which not every transformers 5.x has
        self.start_step = 0
        self.start_tokens = 0

    def on_train_begin(self, args, state, control, **kw):
        self._t = time.perf_counter()
        self._tokens = state.num_input_tokens_seen
        self.start_step, self.start_tokens = state.global_step, state.num_input_tokens_seen or 0

    def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kw: Any) -> None:
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
        self._counted_step: int | None = None

    def state(self) -> dict[str, Any]:
        return {"args": {"patience": self.patience, "min_delta": self.min_delta},
                "attributes": {"best": self.best, "bad": self.bad, "stopped_at": self.stopped_at}}

    def restore(self, checkpoint: Path) -> None:
        """Take the counter and best loss saved in `checkpoint`/trainer_state.json, if there are any."""
        path = Path(checkpoint) / "trainer_state.json"
        if not path.is_file():
            return
        saved = json.loads(path.read_text()).get("stateful_callbacks", {}).get(type(self).__name__)
        if isinstance(saved, list):  # the Trainer stores a list when several callbacks share a class name
            saved = saved[0]
        for k, v in (saved or {}).get("attributes", {}).items():
            if k in ("best", "bad", "stopped_at"):
                setattr(self, k, v)

    @property
    def stopped(self) -> bool:
        """The run has stopped early (also when restored from the checkpoint written at the stop)."""
        return self.stopped_at is not None

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        # only the scheduled evaluations count, once per step: the final evaluation (the same weights as the last
        # scheduled one) and the monitor's probes (placed by wall time with every: auto) do not use up patience
        every = args.eval_steps if isinstance(args.eval_steps, int) and args.eval_steps >= 1 else None
        if (every and state.global_step % every) or state.global_step == self._counted_step:
            return
        self._counted_step = state.global_step
        if self.best is None or loss < self.best - self.min_delta:
            self.best, self.bad = loss, 0
        else:
            self.bad += 1
            if self.bad >= self.patience:
                control.should_training_stop = True
                self.stopped_at = state.global_step


class CheckpointMarker(TrainerCallback):
    """Marks a checkpoint complete once the Trainer has written all of it; resume uses only marked ones. Then
    runs `after_mark` (the Trainer's deletion of checkpoints beyond save_total_limit, deferred to here)."""

    def __init__(self) -> None:
        self.after_mark: list[Any] = []

    def on_save(self, args, state, control, **kw):
        if state.is_world_process_zero:
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if ckpt.is_dir():
                (ckpt / COMPLETE_MARKER).write_text(str(state.global_step))
        pending, self.after_mark = self.after_mark, []
        for run in pending:
            run()


class DivergenceGuard(TrainerCallback):
    """Stops the run at the end of the first optimizer step whose loss or gradient norm is not finite, or whose
    loss is above `factor` x the first logged training loss (that loss taken as at least 1.0, so a run that starts
    near zero is not stopped by an ordinary noisy batch). That step is logged, but neither evaluated nor
    checkpointed; checkpoints whose weights produced it (the previous step's and later) lose their complete
    marker (`invalidate`), so the newest complete checkpoint is the last good one.

    Every step, not only the logged ones: the Trainer's logged loss averages over `logging_steps` and would
    hide a divergence long enough for a bad checkpoint to be written. With several processes the ranks agree
    (one all-reduce of a flag per step) so that all stop at the same step."""

    def __init__(self, factor: float | None, reference: float | None = None):
        self.factor = factor
        self.reference = reference  # the first logged training loss (restored from metrics.jsonl on resume)
        # set by the run (a ForgetlessTrainer, which imports this module): the step's loss and gradient norm
        self.trainer: Trainer | None = None
        self.event: dict[str, Any] | None = None

    def on_log(self, args, state, control, logs=None, **kw):
        loss = (logs or {}).get("loss")
        if self.reference is None and loss is not None and math.isfinite(loss):
            self.reference = float(loss)

    def on_step_end(self, args, state, control, **kw):
        t = self.trainer
        if t is None:
            return
        loss, norm = t.step_loss, t.step_grad_norm
        t.step_loss, t.step_grad_norm = None, None
        loss_v = float(loss) if loss is not None else None
        norm_v = float(norm) if norm is not None else None
        why = None
        if loss_v is not None and not math.isfinite(loss_v):
            why = f"the training loss is {loss_v}"
        elif norm_v is not None and not math.isfinite(norm_v):
            why = f"the gradient norm is {norm_v}"
        elif self.factor and self.reference is not None and loss_v is not None \
                and loss_v > self.factor * max(self.reference, 1.0):
            why = (f"the training loss {loss_v:.6g} is above {self.factor:g} x the first logged training loss "
                   f"{self.reference:.6g} (train.divergence_factor)")
        if dist.world_size() > 1:
            import torch

            flag = torch.tensor([0.0 if why is None else 1.0], device=loss.device if loss is not None else None)
            dist.all_reduce_sum_([flag])
            if flag.item() and why is None:
                why = "another process diverged"
        if why is None:
            return
        self.event = {"step": state.global_step, "why": why, "loss": loss_v, "grad_norm": norm_v,
                      "first_logged_loss": self.reference, "factor": self.factor}
        control.should_training_stop = True
        control.should_save = False
        control.should_evaluate = False
        control.should_log = True

    def invalidate(self, ckpt_root: Path) -> None:
        """Unmark the checkpoints from the step before the divergence on: their weights produced it."""
        if self.event is None or not is_main():
            return
        for p in ckpt_root.glob("checkpoint-*"):
            step = checkpoint_step(p)
            if step is not None and step >= self.event["step"] - 1 and (p / COMPLETE_MARKER).is_file():
                (p / DIVERGED_MARKER).write_text(json.dumps(self.event))
                (p / COMPLETE_MARKER).unlink()


def first_logged_loss(metrics_path: Path) -> float | None:
    """The first training loss in metrics.jsonl (the divergence guard's reference), if any."""
    if metrics_path.is_file():
        for line in metrics_path.read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec and rec["loss"] is not None and math.isfinite(rec["loss"]):
                return float(rec["loss"])
    return None


class FaultPoints(TrainerCallback):
    """The training loop's named points for forgetless.faults (no-ops unless $FORGETLESS_FAULT is set):
    `step@N` once optimizer step N is done, before it is logged or checkpointed; `checkpoint@N` once
    checkpoint-N is written and marked complete."""

    def on_step_end(self, args, state, control, **kw):
        faults.point(f"step@{state.global_step}")

    def on_save(self, args, state, control, **kw):
        faults.point(f"checkpoint@{state.global_step}")


_CHECKPOINT_NAME = re.compile(r"checkpoint-([0-9]+)")  # ASCII digits: str.isdigit() also takes "²", which int() refuses


def checkpoint_step(path: str | Path) -> int | None:
    """The optimizer step of an HF Trainer checkpoint directory, `.../checkpoint-N` -> N; None for any other name
    (a stray `checkpoint-old` beside the real ones is not a checkpoint)."""
    m = _CHECKPOINT_NAME.fullmatch(Path(path).name)
    return int(m.group(1)) if m else None


def train_seconds_before(checkpoint: Path | None) -> float | None:
    """The training seconds a run had spent before `checkpoint` (0.0 with none: a fresh start); None where the
    checkpoint does not record them (written before TRAIN_SECONDS existed)."""
    if checkpoint is None:
        return 0.0
    f = Path(checkpoint) / TRAIN_SECONDS
    return float(f.read_text()) if f.is_file() else None


def latest_complete_checkpoint(ckpt_root: Path) -> Path | None:
    done = [(step, p) for p in ckpt_root.glob("checkpoint-*")
            if (step := checkpoint_step(p)) is not None and (p / COMPLETE_MARKER).is_file()]
    return max(done, key=lambda sp: sp[0], default=(None, None))[1]
