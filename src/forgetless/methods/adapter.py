"""adapter: bottleneck adapters (Houlsby et al. 2019) on the output of each attention and MLP block
(the modules are in bottleneck.py: PEFT has none)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field
from torch import nn

from .base import TrainingMethod, WrapContext, register
from .bottleneck import add_adapters


@register
class AdapterMethod(TrainingMethod):
    """Bottleneck adapters (Houlsby) on the output of each attention and MLP block.

    Mergeable only with `activation: identity` (then the adapter is a linear map folded into the output
    projection).
    """

    name: Literal["adapter"] = "adapter"
    default_lr: ClassVar[float] = 1e-3
    unmergeable_why: ClassVar[str] = "its activation is non-linear (use activation: identity)"
    bottleneck: int = Field(64, gt=0, description="Width of the bottleneck.")
    activation: Literal["relu", "gelu", "silu", "identity"] = Field(
        "gelu", description="Non-linearity in the bottleneck; identity makes the adapter mergeable.")
    target_modules: list[str] | None = Field(
        None, description="Output projections to wrap. None: the attention and MLP output projections."
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout inside the adapter.")

    def can_merge(self) -> bool:
        return self.activation == "identity"

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        add_adapters(model, self.bottleneck, self.activation, self.dropout, self.target_modules)
        return model.to(ctx.device)
