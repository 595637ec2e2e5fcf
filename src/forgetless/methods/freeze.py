"""freeze: train only the top k transformer blocks (and optionally the LM head and final norm)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator
from torch import nn

from ..blocks import find_blocks
from ..errors import ForgetlessError
from .base import TrainingMethod, WrapContext, register


@register
class FreezeMethod(TrainingMethod):
    """Train only the top k transformer blocks and/or the LM head; everything else frozen."""

    name: Literal["freeze"] = "freeze"
    peft: ClassVar[bool] = False
    shardable: ClassVar[bool] = True
    top_k_blocks: int = Field(2, ge=0, description="Number of top blocks to train.")
    train_lm_head: bool = Field(False, description="Also train the LM head (tied embeddings train with it).")
    train_final_norm: bool = Field(True, description="Also train the final normalisation layer.")

    @model_validator(mode="after")
    def _something_trains(self) -> FreezeMethod:
        if self.top_k_blocks == 0 and not self.train_lm_head:
            raise ValueError("freeze trains nothing: set top_k_blocks > 0 or train_lm_head: true")
        return self

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(False)
        blocks = find_blocks(model)
        if self.top_k_blocks > len(blocks):
            raise ForgetlessError(f"method.top_k_blocks={self.top_k_blocks} but the model has {len(blocks)} blocks")
        for block in list(blocks)[len(blocks) - self.top_k_blocks :]:
            for p in block.parameters():
                p.requires_grad_(True)
        if self.train_lm_head:
            for p in model.get_output_embeddings().parameters():  # type: ignore[operator]  # a PreTrainedModel
                p.requires_grad_(True)
        if self.train_final_norm:
            block_params = {id(p) for p in blocks.parameters()}
            for name, p in model.named_parameters():
                if "norm" in name.rsplit(".", 2)[-2] and id(p) not in block_params:
                    p.requires_grad_(True)
        return model
