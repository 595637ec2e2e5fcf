"""lora: low-rank adapters on the linear layers (PEFT LoRA, Hu et al. 2021)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field

from .base import TrainingMethod, register


@register
class LoraMethod(TrainingMethod):
    """LoRA (PEFT). `target_modules: all-linear` adapts every linear layer but the LM head."""

    name: Literal["lora"] = "lora"
    default_lr: ClassVar[float] = 2e-4
    shardable: ClassVar[bool] = True
    lora_like: ClassVar[bool] = True
    r: int = Field(16, gt=0, description="Rank of the low-rank update.")
    alpha: float = Field(32, gt=0, description="Scale: the update is multiplied by alpha / r (alpha / sqrt(r) with "
                         "use_rslora).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the adapter's input.")
    target_modules: str | list[str] = Field("all-linear", description="Module names to adapt, or all-linear (every "
                                            "linear layer but the LM head).")
    use_rslora: bool = Field(False, description="Rank-stabilised scaling alpha / sqrt(r).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases train (PEFT's bias option).")

    def peft_config(self, model_path: str) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,  # type: ignore[arg-type]  # peft annotates int; a float alpha works
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_dora=self.name == "dora",
            use_rslora=self.use_rslora,
            bias=self.bias,
            task_type="CAUSAL_LM",
        )
