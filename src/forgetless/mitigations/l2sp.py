"""l2sp: pull the trainable weights toward their pretrained values (Li et al. 2018, "L2-SP").

penalty = weight / 2 * sum ||theta - theta0||^2 over the trainable parameters; theta0 is kept for those only.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from ..schema import Strict
from .base import CarryStep, QuadraticPenalty, TrainContext, file_backed, register, tensor_bytes


class L2SPConfig(Strict):
    name: Literal["l2sp"] = "l2sp"
    weight: float = Field(0.01, ge=0, description="lambda: strength of the pull toward the pretrained weights.")
    clip: bool = Field(False, description="Add the penalty's gradient before the Trainer clips gradients (clipped "
                       "with the task gradient, counted in grad_norm); default: after clipping, at full strength.")


@register(L2SPConfig)
class L2SP(QuadraticPenalty):
    name = "l2sp"
    deepspeed_why = ("DeepSpeed ZeRO keeps gradients in its own partitioned buffers, not in .grad, where the penalty "
                     "adds its gradient")

    @classmethod
    def carry(cls, options: dict[str, Any], step: CarryStep) -> dict[str, Any]:
        """In a sequence: every step pulls toward its own starting weights (the previous step's result)."""
        return {"name": cls.name, **options}

    def setup(self, ctx: TrainContext) -> None:
        named = ctx.trainable()
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.anchor = file_backed([p.detach().float() for p in self.params], ctx.mmap_dir)
        self.extra_bytes = tensor_bytes(self.anchor)
