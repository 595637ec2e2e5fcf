"""A thin subclass of transformers' Trainer: the one path by which mitigations reach training.

`ForgetlessTrainer(mitigations=[...])` wires every hook of forgetless.mitigations: loss terms per micro-batch
(`loss`), the per-step hooks (`observe_step`, `penalty_grad`, through MitigationCallback), and the penalties
with `clip: true`, whose gradients are added just before the Trainer clips (see mitigations/base.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from .. import faults
from ..io import atomic_write_text, plain_modes
from ..mitigations import Mitigation, MitigationCallback, loss_term
from ..mitigations.base import save_states
from .callbacks import METRICS_LINES, TRAIN_SECONDS, CheckpointMarker

# A loss term: (model, inputs, outputs) -> tensor to add to the task loss, or None.
LossTerm = Callable[[torch.nn.Module, dict[str, Any], Any], "torch.Tensor | None"]


class ReplayAwareCollator:
    """Pads like `inner`, and turns the per-example `replay` flag into a `replay_mask` tensor; on-policy
    self-distillation's `teacher_ids` (the teacher's prompt) pass as a list, None for examples without one.

    It sees only this process's share of each global batch (the sampler splits the batch across ranks
    before collation), so the mask always lines up with the rows this rank's loss terms score."""

    def __init__(self, inner: Callable):
        self.inner = inner

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        flags = [bool(f.get("replay", False)) for f in features]
        teacher = [f.get("teacher_ids") for f in features]
        batch = self.inner([{k: v for k, v in f.items() if k not in ("replay", "teacher_ids")} for f in features])
        if any(flags):
            batch["replay_mask"] = torch.tensor(flags)
        if any(t is not None for t in teacher):
            batch["teacher_ids"] = teacher
        return batch


class ForgetlessTrainer(Trainer):
    def __init__(self, *args: Any, mitigations: list[Mitigation] | None = None,
                 loss_terms: list[LossTerm] | None = None, **kwargs: Any):
        mitigations = list(mitigations or [])
        self.metrics_path: Path | None = None  # set by the run: checkpoints record its line count
        self.train_clock: Callable[[], float] | None = None  # set by the run: the training seconds so far, all sessions
        self.monitor: Any = None  # set by the run: the retention monitor (guard.MonitorCallback), saved in checkpoints
        self.mitigation_hooks = MitigationCallback(mitigations) if mitigations else None
        if self.mitigation_hooks is not None:
            kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), self.mitigation_hooks]
        super().__init__(*args, **kwargs)
        self.loss_terms: list[LossTerm] = [loss_term(m) for m in mitigations if type(m).loss is not Mitigation.loss]
        self.loss_terms += list(loss_terms or [])
        self._clipped_added = False
        # this optimizer step's loss (summed over its micro-batches, as the Trainer logs it) and gradient norm:
        # the divergence guard (callbacks.DivergenceGuard) reads them at the end of every step
        self.step_loss: torch.Tensor | None = None
        self.step_grad_norm: Any = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._clipped_added = False  # a new optimizer step's penalties are still to add
        loss = super().training_step(model, inputs, num_items_in_batch)
        self.step_loss = loss.detach() if self.step_loss is None else self.step_loss + loss.detach()
        return loss

    def _add_clipped_penalties(self) -> None:
        if self.mitigation_hooks is not None and not self._clipped_added:
            self._clipped_added = True
            self.mitigation_hooks.add_clipped_penalties()

    def _clip_grad_norm(self, model):
        self._add_clipped_penalties()  # clip: true penalties are clipped with the task gradient
        return super()._clip_grad_norm(model)

    def _get_grad_norm(self, model, grad_norm=None):
        self._add_clipped_penalties()  # optim.max_grad_norm 0 (no clipping): still counted in grad_norm
        self.step_grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        return self.step_grad_norm

    def _run_epoch(self, *args: Any, **kwargs: Any) -> Any:
        # Resumed from the checkpoint of the last step (killed during the final evaluation or save), the
        # Trainer would still start the epoch the step budget ends in and take one optimizer step more than
        # max_steps: nothing is left to train, so no epoch starts.
        # Likewise resumed from the checkpoint written where early stopping stopped the run.
        early = any(getattr(cb, "stopped", False) for cb in self.callback_handler.callbacks)
        if 0 < self.state.max_steps <= self.state.global_step or early:
            self.control.should_training_stop = True
            return None
        return super()._run_epoch(*args, **kwargs)

    def _save_checkpoint(self, model, trial):
        # The Trainer deletes checkpoints beyond save_total_limit as it writes a new one, before that one is marked
        # complete: a kill in between left no complete checkpoint to resume from. The deletion is deferred to the
        # CheckpointMarker, which runs it once the new checkpoint is marked.
        import transformers.trainer as hf_trainer

        rotate, deferred = hf_trainer.rotate_checkpoints, []
        hf_trainer.rotate_checkpoints = lambda **kw: deferred.append(kw)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            hf_trainer.rotate_checkpoints = rotate
        marker = next((cb for cb in self.callback_handler.callbacks if isinstance(cb, CheckpointMarker)), None)
        for kw in deferred:
            if marker is not None:
                marker.after_mark.append(lambda kw=kw: rotate(**kw))
            else:
                rotate(**kw)
        # beside the weights, before the on_save callbacks mark the checkpoint complete
        if self.args.should_save:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            folder = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            if self.mitigation_hooks is not None:
                save_states(self.mitigation_hooks.mitigations, folder)
            if self.monitor is not None:  # the retention monitor's and guard's state (rank 0 writes it)
                self.monitor.save_checkpoint(folder)
            if self.metrics_path is not None and self.args.process_index == 0:
                lines = self.metrics_path.read_text().count("\n") if self.metrics_path.is_file() else 0
                atomic_write_text(folder / METRICS_LINES, f"{lines}\n")
            if self.train_clock is not None and self.args.process_index == 0:
                atomic_write_text(folder / TRAIN_SECONDS, f"{self.train_clock():.3f}\n")
            plain_modes(folder)  # the Trainer's safetensors are written 0600 (forgetless.io.plain_modes)
        faults.point(f"written@{self.state.global_step}")  # written, not yet marked complete

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        replay_mask = inputs.pop("replay_mask", None)
        teacher_ids = inputs.pop("teacher_ids", None)
        if not self.loss_terms or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if teacher_ids is not None and not bool((inputs["labels"] != -100).any()):
            # no token of this micro-batch carries the task loss (on-policy self-distillation's prompts): the loss
            # terms are all of it, and the task forward is skipped
            loss, outputs = torch.zeros((), device=inputs["labels"].device), None
        else:
            loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        # When the task loss is already normalised over the whole accumulated batch, the Trainer does not
        # divide by the accumulation steps: do it for the per-micro-batch terms so each counts once per step.
        scale = 1.0
        if self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            scale = 1.0 / max(1, self.current_gradient_accumulation_steps)
        term_inputs = {**inputs, **({"replay_mask": replay_mask} if replay_mask is not None else {}),
                       **({"teacher_ids": teacher_ids} if teacher_ids is not None else {})}
        for term in self.loss_terms:
            extra = term(model, term_inputs, outputs)
            if extra is not None:
                loss = loss + scale * extra
        return (loss, outputs) if return_outputs else loss
