"""prompt: trained soft-prompt embeddings (Lester et al. 2021; PEFT prompt tuning)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from .base import TrainingMethod, register


@register
class PromptMethod(TrainingMethod):
    """Prompt tuning (PEFT): trained soft-prompt embeddings."""

    name: Literal["prompt"] = "prompt"
    default_lr: ClassVar[float] = 3e-3
    mergeable: ClassVar[bool] = False
    num_virtual_tokens: int = Field(20, gt=0, description="Length of the soft prompt.")
    init_text: str | None = Field(None, description="Initialise the soft prompt from this text's embeddings.")

    def peft_config(self, model_path: str) -> Any:
        from peft import PromptTuningConfig, PromptTuningInit

        kw: dict[str, Any] = {}
        if self.init_text:
            kw = {
                "prompt_tuning_init": PromptTuningInit.TEXT,
                "prompt_tuning_init_text": self.init_text,
                "tokenizer_name_or_path": model_path,
            }
        return PromptTuningConfig(num_virtual_tokens=self.num_virtual_tokens, task_type="CAUSAL_LM", **kw)
