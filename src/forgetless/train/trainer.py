"""A thin subclass of transformers' Trainer: extra loss terms per step (the mitigations' hook)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import Trainer

# A loss term: (model, inputs, outputs) -> tensor to add to the task loss, or None.
LossTerm = Callable[[torch.nn.Module, dict[str, Any], Any], "torch.Tensor | None"]


class ForgetlessTrainer(Trainer):
    def __init__(self, *args: Any, loss_terms: list[LossTerm] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_terms: list[LossTerm] = list(loss_terms or [])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not self.loss_terms or not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, True, num_items_in_batch)
        for term in self.loss_terms:
            extra = term(model, inputs, outputs)
            if extra is not None:
                loss = loss + extra
        return (loss, outputs) if return_outputs else loss
