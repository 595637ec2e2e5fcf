"""full: full-parameter fine-tuning (every weight trains, in fp32)."""

from __future__ import annotations

from typing import ClassVar, Literal

from torch import nn

from .base import TrainingMethod, WrapContext, register


@register
class FullMethod(TrainingMethod):
    """Full-parameter fine-tuning."""

    name: Literal["full"] = "full"
    peft: ClassVar[bool] = False
    shardable: ClassVar[bool] = True

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        return model.float()
