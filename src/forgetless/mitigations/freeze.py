"""freeze: keep parts of the network fixed on top of any method: embeddings, the bottom k blocks, or the
parameters whose name matches a pattern."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from ..blocks import find_blocks
from ..errors import ForgetlessError
from ..schema import Strict
from .base import Mitigation, TrainContext, register


class FreezeConfig(Strict):
    name: Literal["freeze"] = "freeze"
    embeddings: bool = Field(False, description="Freeze the input embeddings (and a tied LM head with them).")
    bottom_k_blocks: int = Field(0, ge=0, description="Freeze the k lowest transformer blocks.")
    pattern: str | None = Field(None, description="Freeze parameters whose name matches this regex.")

    @model_validator(mode="after")
    def _something(self) -> FreezeConfig:
        if not (self.embeddings or self.bottom_k_blocks or self.pattern):
            raise ValueError("freeze freezes nothing: set embeddings, bottom_k_blocks or pattern")
        if self.pattern:
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"pattern is not a valid regex: {e}") from None
        return self


@register(FreezeConfig)
class Freeze(Mitigation):
    name = "freeze"

    def setup(self, ctx: TrainContext) -> None:
        model, cfg = ctx.model, self.config
        frozen: set[int] = set()
        if cfg.embeddings:
            frozen |= {id(p) for p in model.get_input_embeddings().parameters()}  # type: ignore[operator]  # HF model
        if cfg.bottom_k_blocks:
            blocks = find_blocks(model)
            if cfg.bottom_k_blocks > len(blocks):
                raise ForgetlessError(f"mitigations.freeze.bottom_k_blocks={cfg.bottom_k_blocks}, but the model has "
                                      f"{len(blocks)} blocks")
            for block in list(blocks)[: cfg.bottom_k_blocks]:
                frozen |= {id(p) for p in block.parameters()}
        pat = re.compile(cfg.pattern) if cfg.pattern else None
        n = 0
        for name, p in model.named_parameters():
            if p.requires_grad and (id(p) in frozen or (pat and pat.search(name))):
                p.requires_grad_(False)
                n += p.numel()
        if not any(p.requires_grad for p in model.parameters()):
            raise ForgetlessError("mitigations.freeze froze every trainable parameter: nothing left to train")
        self.notes["frozen_parameters"] = n
