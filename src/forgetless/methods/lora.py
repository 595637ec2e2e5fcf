"""lora: low-rank adapters on the linear layers (PEFT LoRA, Hu et al. 2021), with a choice of initialisation.

`init:` (every choice leaves the model's output unchanged at step 0):
- `default`: A random (Kaiming), B = 0 (PEFT's default);
- `gaussian`: A Gaussian scaled by the rank, B = 0;
- `pissa`: the r largest singular components of each weight move into the adapter, the residual stays frozen
  (PiSSA, Meng et al. 2024; PEFT);
- `orthonormal`: PEFT's OLoRA initialisation (a QR decomposition of each weight; not the O-LoRA mitigation);
- `milora`: the r smallest singular components move into the adapter (MiLoRA, Wang et al. 2024): training edits
  the directions that carry the least of what the model knows.
The last three move part of the base weights into the adapter, so "adapters disabled" is no longer the base
model: the final adapter is saved converted to a standard LoRA against the original base (PEFT's conversion,
rank 2r; the initial adapter is kept in the run's initial_adapter/), and mitigations that need the base behind
disabled adapters (kl, self_replay) or data.self_distill are refused with them.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from .base import TrainingMethod, register

#: PEFT's init_lora_weights for each `init:` (milora: PEFT's default, then replaced by milora_init)
_PEFT_INIT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "orthonormal": "olora",
                              "milora": True}
MOVES_BASE = ("pissa", "orthonormal", "milora")


def minor_components(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MiLoRA's split of W (out x in): A (r x in) and B (out x r) from the r smallest singular components, scaled
    so that scaling * B @ A is exactly that part of W, and the residual W - scaling * B @ A."""
    w = weight.float()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    ur, sr, vhr = u[:, -r:], s[-r:] / scaling, vh[-r:]
    a = torch.diag(torch.sqrt(sr)) @ vhr
    b = ur @ torch.diag(torch.sqrt(sr))
    return a, b, w - scaling * b @ a


@torch.no_grad()
def milora_init(model: nn.Module, adapter_name: str = "default") -> int:
    """Re-initialise every LoRA layer of a PEFT model with MiLoRA; returns the number of layers."""
    from peft.tuners.lora import LoraLayer

    n = 0
    for module in model.modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        base = module.get_base_layer()
        fan_in_fan_out = getattr(module, "fan_in_fan_out", False)
        weight = base.weight.data.T if fan_in_fan_out else base.weight.data
        a, b, residual = minor_components(weight, module.r[adapter_name], module.scaling[adapter_name])
        module.lora_A[adapter_name].weight.data = a.to(module.lora_A[adapter_name].weight.dtype)
        module.lora_B[adapter_name].weight.data = b.to(module.lora_B[adapter_name].weight.dtype)
        residual = residual.T if fan_in_fan_out else residual
        base.weight.data = residual.to(base.weight.dtype)
        n += 1
    return n


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
    init: Literal["default", "gaussian", "pissa", "orthonormal", "milora"] = Field(
        "default", description="Adapter initialisation (see methods/lora.py): default, gaussian, pissa, orthonormal "
        "(PEFT's OLoRA), milora; the last three move part of the base into the adapter.")

    @model_validator(mode="after")
    def _init_supported(self) -> LoraMethod:
        if self.init in MOVES_BASE and self.name != "lora":
            raise ValueError(f"init: {self.init} is supported with method lora only (not {self.name}): it moves part "
                             "of the base weights into the adapter, which forgetless has not made correct for "
                             f"{self.name}")
        return self

    @property
    def moves_base(self) -> bool:
        """Part of the base weights lives in the adapter: disabling it does not give the base model."""
        return self.init in MOVES_BASE

    def peft_config(self, model_path: str) -> Any:
        from peft import LoraConfig

        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            use_dora=self.name == "dora",
            use_rslora=self.use_rslora,
            bias=self.bias,
            init_lora_weights=_PEFT_INIT[self.init],
            task_type="CAUSAL_LM",
        )

    def wrap(self, model: nn.Module, model_path: str, device: torch.device, gradient_checkpointing: bool) -> nn.Module:
        model = super().wrap(model, model_path, device, gradient_checkpointing)
        if self.init == "milora":
            milora_init(model)
        return model
