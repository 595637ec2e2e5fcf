"""qlora: LoRA on a 4-bit quantized base (Dettmers et al. 2023; bitsandbytes)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from ..errors import ForgetlessError
from ..io import atomic_write_json
from .base import WrapContext, register
from .lora import LoraMethod

#: Saved beside a QLoRA adapter: how its base was quantized, so loading puts it back on the same 4-bit base.
QUANT_FILE = "forgetless_quantization.json"


@register
class QLoraMethod(LoraMethod):
    """LoRA on a 4-bit base (bitsandbytes; works on CPU; nf4 needs input widths that are multiples of 64)."""

    name: Literal["qlora"] = "qlora"  # type: ignore[assignment]
    shardable: ClassVar[bool] = False
    merge_full_precision: ClassVar[bool] = True
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type of the frozen base.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (saves ~0.4 bit/weight).")

    def quantization(self, compute_dtype: torch.dtype) -> Any:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise ForgetlessError("method qlora needs bitsandbytes: pip install 'forgetless[qlora]'") from None
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=self.quant_type,
            bnb_4bit_use_double_quant=self.double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
        )

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ctx.gradient_checkpointing)
        return super().wrap(model, ctx)

    def export_files(self, out_dir: Path, bf16: bool) -> None:
        atomic_write_json(out_dir / QUANT_FILE, {
            "quant_type": self.quant_type,
            "double_quant": self.double_quant,
            "compute_dtype": "bfloat16" if bf16 else "float32",
        })
