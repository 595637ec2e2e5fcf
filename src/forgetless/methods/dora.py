"""dora: weight-decomposed low-rank adaptation (Liu et al. 2024; PEFT `use_dora`)."""

from __future__ import annotations

from typing import Literal

from .base import register
from .lora import LoraMethod


@register
class DoraMethod(LoraMethod):
    """DoRA: weight-decomposed LoRA (PEFT `use_dora`)."""

    name: Literal["dora"] = "dora"  # type: ignore[assignment]
