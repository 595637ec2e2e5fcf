"""prefix: trained key/value prefixes in every layer (Li and Liang 2021; PEFT prefix tuning)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from .base import TrainingMethod, register


@register
class PrefixMethod(TrainingMethod):
    """Prefix tuning (PEFT): trained key/value prefixes in every layer."""

    name: Literal["prefix"] = "prefix"
    default_lr: ClassVar[float] = 3e-3
    mergeable: ClassVar[bool] = False
    num_virtual_tokens: int = Field(20, gt=0, description="Length of the trained prefix.")
    prefix_projection: bool = Field(False, description="Reparameterise the prefix through an MLP while training.")

    def peft_config(self, model_path: str) -> Any:
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(num_virtual_tokens=self.num_virtual_tokens, prefix_projection=self.prefix_projection,
                                  task_type="CAUSAL_LM")
