"""lora: low-rank adapters on the linear layers (PEFT LoRA, Hu et al. 2021), with a choice of initialisation.

`init:` (every choice leaves the model's output unchanged at step 0):
- `default`: A random (Kaiming), B = 0 (PEFT's default);
- `gaussian`: A Gaussian scaled by the rank, B = 0;
- `pissa`: the r largest singular components of each weight move into the adapter, the residual stays frozen
  (PiSSA, Meng et al. 2024; PEFT);
- `orthonormal`: PEFT's OLoRA initialisation (a QR decomposition of each weight; not the O-LoRA mitigation);
- `milora`: the r smallest singular components move into the adapter (MiLoRA, Wang et al. 2024): training edits
  the directions that carry the least of what the model knows;
- `corda_kpm` / `corda_ipm`: CorDA (Yang et al. 2024; PEFT): each weight decomposed under the covariance of its
  inputs on calibration data; knowledge-preserved mode (kpm) trains the directions that matter least for that
  data, which should be world-knowledge questions (`init_data:`, required: forgetless ships none), so what they
  need is left alone; instruction-previewed mode (ipm) trains the directions that matter most for the task's
  own data (`init_data:`, default the training data);
- `eva`: EVA (Paischer et al. 2024; PEFT): A from the SVD of each layer's inputs on calibration data (default
  the training data), B = 0, ranks redistributed by explained variance (rho 2).
pissa, orthonormal, milora and corda move part of the base weights into the adapter, so "adapters disabled" is no
longer the base model: the final adapter is saved converted to a standard LoRA against the original base (PEFT's
conversion, rank 2r; the initial adapter is kept in the run's initial_adapter/), and mitigations that need the base
behind disabled adapters (kl, self_replay), olora (its penalties pull the adapter, now part of the base, toward
zero), data.self_distill, biases (the conversion keeps LoRA weights only), DoRA (no magnitude vectors in the
conversion) and QLoRA (a quantized residual) are refused with them. Their checkpoints stay relative to the moved
base; train.model.load_model converts a checkpoint from the run's initial_adapter/ as it loads it.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, cast

import torch
from pydantic import Field, model_validator
from torch import nn

from ..config import DataConfig
from ..errors import ForgetlessError
from ..progress import heartbeat
from .base import TrainingMethod, WrapContext, register

#: PEFT's init_lora_weights for each `init:` (milora: PEFT's default, then replaced by milora_init)
_PEFT_INIT: dict[str, Any] = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "orthonormal": "olora",
                              "milora": True, "corda_kpm": "corda", "corda_ipm": "corda", "eva": "eva"}
MOVES_BASE = ("pissa", "orthonormal", "milora", "corda_kpm", "corda_ipm")
DATA_DRIVEN = ("corda_kpm", "corda_ipm", "eva")


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
        base_weight = cast(torch.Tensor, module.get_base_layer().weight)
        lora_a = cast(torch.Tensor, module.lora_A[adapter_name].weight)
        lora_b = cast(torch.Tensor, module.lora_B[adapter_name].weight)
        fan_in_fan_out = getattr(module, "fan_in_fan_out", False)
        weight = base_weight.data.T if fan_in_fan_out else base_weight.data
        a, b, residual = minor_components(weight, module.r[adapter_name], module.scaling[adapter_name])
        lora_a.data = a.to(lora_a.dtype)
        lora_b.data = b.to(lora_b.dtype)
        residual = residual.T if fan_in_fan_out else residual
        base_weight.data = residual.to(base_weight.dtype)
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
    init: Literal["default", "gaussian", "pissa", "orthonormal", "milora", "corda_kpm", "corda_ipm", "eva"] = Field(
        "default", description="Adapter initialisation (see methods/lora.py): default, gaussian, pissa, orthonormal "
        "(PEFT's OLoRA), milora, corda_kpm, corda_ipm, eva; pissa, orthonormal, milora and corda move part of the "
        "base into the adapter (method lora only); qlora takes default and gaussian only.")
    init_data: DataConfig | None = Field(None, description="corda_kpm (required: e.g. world-knowledge questions), "
                                         "corda_ipm, eva: the calibration data; default the training data (refused "
                                         "with the other inits, and with self_distill in it).")
    init_samples: int = Field(256, gt=0, description="Calibration examples for corda / eva.")

    @model_validator(mode="after")
    def _init_supported(self) -> LoraMethod:
        if self.init == "corda_kpm" and self.init_data is None:
            raise ValueError("init: corda_kpm needs init_data: the data whose knowledge to preserve (for example "
                             "TriviaQA / NQ questions, format text); forgetless ships none")
        if self.init_data is not None and self.init not in DATA_DRIVEN:
            raise ValueError(f"init_data: used by init corda_kpm, corda_ipm or eva only, not {self.init}")
        if self.init_data is not None and self.init_data.self_distill is not None:
            raise ValueError("init_data.self_distill: only the training data (data.self_distill) is rewritten")
        if self.init in MOVES_BASE and self.bias != "none":
            raise ValueError(f"bias: {self.bias} is not supported with init {self.init} (the adapter saved against "
                             "the original base carries LoRA weights only: trained biases would be lost); use bias "
                             "none")
        if self.init in MOVES_BASE and self.name != "lora":
            why = {"dora": "the adapter is saved converted to a standard LoRA against the original base, and that "
                           "conversion (PEFT's) keeps no DoRA magnitude vectors",
                   "qlora": "the residual base would be quantized, and a LoRA against the original 4-bit base does "
                            "not give back the trained model (Quant(W_res) + BA differs from Quant(W) + dW)"}
            raise ValueError(f"init: {self.init} is supported with method lora only (not {self.name}): it moves part "
                             f"of the base weights into the adapter; {why.get(self.name, 'not made correct there')}")
        if self.init == "eva" and self.name == "qlora":
            raise ValueError("init: eva is not supported with method qlora: its calibration pass on a 4-bit base is "
                             "not made to work in forgetless yet; use method lora or dora")
        return self

    @property
    def moves_base(self) -> bool:
        """Part of the base weights lives in the adapter: disabling it does not give the base model."""
        return self.init in MOVES_BASE

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
            init_lora_weights=_PEFT_INIT[self.init],
            task_type="CAUSAL_LM",
            **self._init_configs(),
        )

    def _init_configs(self) -> dict[str, Any]:
        from peft.tuners.lora.config import CordaConfig, EvaConfig

        if self.init.startswith("corda"):
            return {"corda_config": CordaConfig(corda_method="kpm" if self.init == "corda_kpm" else "ipm")}
        if self.init == "eva":
            return {"eva_config": EvaConfig(rho=2.0)}
        return {}

    def _calibration(self, ctx: WrapContext) -> list[dict[str, Any]]:
        if ctx.calibration is None:
            raise ForgetlessError(f"method.init {self.init} needs calibration data, and none is at hand here")
        examples = ctx.calibration(self.init_data, self.init_samples)
        if not examples:
            raise ForgetlessError(f"method.init {self.init}: the calibration data has no usable examples")
        return examples

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        if self.init.startswith("corda"):
            from peft import get_peft_model
            from peft.tuners.lora.corda import preprocess_corda

            examples = self._calibration(ctx)
            config = self.peft_config(ctx.model_path)
            if config.target_modules == "all-linear":  # CorDA's preprocessing matches names; all-linear, spelled out
                head = cast(Any, model).get_output_embeddings()
                config.target_modules = {n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                         if isinstance(m, nn.Linear) and m is not head}
            device = next(model.parameters()).device

            @torch.no_grad()
            def run_model() -> None:  # the covariance of every target layer's inputs over the calibration examples
                was_training = model.training
                model.eval()
                for ex in examples:
                    model(input_ids=torch.tensor([ex["input_ids"]], device=device))
                model.train(was_training)

            with heartbeat(f"method.init {self.init}: the covariance of {len(config.target_modules)} target module "
                           f"kinds' inputs over {len(examples)} calibration examples, then each layer's decomposition"):
                preprocess_corda(model, config, run_model=run_model)
            return get_peft_model(model, config)
        if self.init == "eva":
            from peft import get_peft_model
            from peft.tuners.lora import initialize_lora_eva_weights

            examples = self._calibration(ctx)
            peft_model = get_peft_model(model, self.peft_config(ctx.model_path), low_cpu_mem_usage=True)
            device = next(model.parameters()).device
            batches = [{"input_ids": torch.tensor([ex["input_ids"]], device=device),
                        "attention_mask": torch.ones(1, len(ex["input_ids"]), dtype=torch.long, device=device)}
                       for ex in examples]
            with heartbeat(f"method.init eva: each layer's input directions over {len(examples)} calibration examples"):
                # every process holds the same calibration examples (they are not sharded), so each computes one
                # process's init itself; PEFT's default gathers every rank's layer inputs, which would feed the
                # incremental SVD each input world_size times and change its path (adapters 2-9% apart, measured)
                initialize_lora_eva_weights(peft_model, dataloader=batches, show_progress_bar=False,
                                            gather_distributed_inputs=False)
            return peft_model
        model = super().wrap(model, ctx)
        if self.init == "milora":
            milora_init(model)
        return model
