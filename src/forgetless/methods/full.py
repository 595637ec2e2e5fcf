"""full: full-parameter fine-tuning (every weight trains, in fp32)."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from .base import TrainingMethod, register


@register
class FullMethod(TrainingMethod):
    """Full-parameter fine-tuning."""

    name: Literal["full"] = "full"
    peft: ClassVar[bool] = False
    shardable: ClassVar[bool] = True

    def wrap(self, model: nn.Module, model_path: str, device: torch.device, gradient_checkpointing: bool) -> nn.Module:
        return model.float()
