"""ia3: learned rescaling of keys, values and feed-forward activations (Liu et al. 2022; PEFT IA3)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from .base import TrainingMethod, register


@register
class IA3Method(TrainingMethod):
    """IA3 (PEFT): learned rescaling of keys, values and feed-forward activations."""

    name: Literal["ia3"] = "ia3"
    default_lr: ClassVar[float] = 3e-3
    target_modules: list[str] | None = Field(None, description="None: PEFT's default for the architecture.")
    feedforward_modules: list[str] | None = Field(None, description="Which of target_modules are feed-forward "
                                                  "(scaled on their input). None: PEFT's default.")

    def peft_config(self, model_path: str) -> Any:
        from peft import IA3Config

        return IA3Config(target_modules=self.target_modules, feedforward_modules=self.feedforward_modules,
                         task_type="CAUSAL_LM")
