"""olora: keep a new LoRA adapter's subspace orthogonal to earlier tasks' adapters (O-LoRA, Wang et al. 2023).

A LoRA update B A writes into the row space of A (r directions of each layer's input). O-LoRA learns
each task in its own low-rank subspace: with the earlier tasks' adapters A_1..A_k kept (their run
directories' `final/`), training adds

    weight/2 * sum over layers and earlier adapters of ||A_new A_i^T||_F^2   (+ l2/2 * ||new adapter||^2)

whose gradient, weight * (A_new A_prev^T) A_prev with A_prev the earlier A's stacked, is added once per
optimizer step like the quadratic penalties (no autograd, not multiplied by gradient accumulation).
Layers an earlier adapter did not adapt are not constrained. `forgetless continual` (carry.olora) keeps
each task's adapter and fills `previous:` for every step after the first.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal, cast

import torch
from pydantic import Field
from safetensors.torch import load_file

from ..errors import ForgetlessError
from ..methods import lora_like_methods
from ..schema import Strict
from .base import CarryStep, Mitigation, TrainContext, register, tensor_bytes

ADAPTER_FILE = "adapter_model.safetensors"
_LIVE_A = re.compile(r"^(.*)\.lora_A\.[^.]+\.weight$")  # base_model.model....q_proj.lora_A.default.weight
_SAVED_A = re.compile(r"^(.*)\.lora_A\.weight$")  # base_model.model....q_proj.lora_A.weight


class OLoRAConfig(Strict):
    name: Literal["olora"] = "olora"
    weight: float = Field(0.5, ge=0, description="lambda_1: strength of the orthogonality penalty.")
    l2: float = Field(0.0, ge=0, description="lambda_2: L2 penalty on the new adapter's weights.")
    previous: list[str] = Field(
        default_factory=list,
        description="Earlier tasks' LoRA adapters: adapter directories or run directories (their final/)."
    )


def adapter_file(path: str | Path) -> Path:
    p = Path(path)
    for cand in (p / "final" / ADAPTER_FILE, p / ADAPTER_FILE, p):
        if cand.is_file():
            return cand
    raise ForgetlessError(f"mitigations.olora.previous {path}: no LoRA adapter ({ADAPTER_FILE}) found there")


def lora_a_matrices(path: str | Path) -> dict[str, torch.Tensor]:
    """The A matrices of a saved LoRA adapter, by module path."""
    out = {}
    for key, t in load_file(str(adapter_file(path))).items():
        m = _SAVED_A.match(key)
        if m:
            out[m.group(1)] = t.float()
    if not out:
        raise ForgetlessError(f"mitigations.olora.previous {path}: the adapter has no lora_A weights (not a LoRA "
                              "adapter?)")
    return out


def subspace_overlap(new: dict[str, torch.Tensor], previous: list[dict[str, torch.Tensor]]) -> float:
    """Mean over shared modules and earlier adapters of ||A_new A_i^T||_F / (||A_new||_F ||A_i||_F), in [0, 1]:
    0 = orthogonal subspaces (O-LoRA's goal)."""
    vals = []
    for prev in previous:
        for mod, a in new.items():
            b = prev.get(mod)
            if b is None or b.shape[1] != a.shape[1]:
                continue
            denom = float(a.norm() * b.norm())
            if denom > 0:
                vals.append(float((a @ b.T).norm()) / denom)
    return sum(vals) / len(vals) if vals else float("nan")


@register(OLoRAConfig)
class OLoRA(Mitigation):
    name = "olora"
    shardable = False
    unsharded_why = "its penalty reads whole adapter matrices"
    carry_fills = ("previous",)

    @classmethod
    def check_recipe(cls, config: OLoRAConfig, recipe: Any) -> None:
        if not recipe.method.lora_like:
            raise ValueError(f"mitigations.olora needs a LoRA-type method ({', '.join(lora_like_methods())}); "
                             f"method.name is {recipe.method.name!r}")

    @classmethod
    def carry(cls, options: dict[str, Any], step: CarryStep) -> dict[str, Any] | None:
        """From step 2: orthogonal to every earlier step's adapter."""
        if step.index < 2:
            return None
        return {"name": cls.name, **options, "previous": [str(d) for d in step.previous]}

    def __init__(self, config: OLoRAConfig):
        super().__init__(config)
        self.a_params: list[torch.nn.Parameter] = []
        self.a_prev: list[torch.Tensor] = []  # per constrained A: earlier A's stacked, [sum r_i, in]
        self.a_names: list[str] = []
        self.all_params: list[torch.nn.Parameter] = []
        self.prev_mats: list[dict[str, torch.Tensor]] = []

    def setup(self, ctx: TrainContext) -> None:
        named = ctx.trainable()
        live = {m.group(1): p for n, p in named if (m := _LIVE_A.match(n))}
        if not live:
            raise ForgetlessError(
                f"mitigations.olora needs a LoRA-type method (lora, dora, qlora); method {ctx.recipe.method.name!r} "
                "has no lora_A weights"
            )
        self.all_params = [p for _, p in named]
        self.prev_mats = [lora_a_matrices(p) for p in self.config.previous]
        for mod, p in sorted(live.items()):
            mats = [prev[mod] for prev in self.prev_mats if mod in prev and prev[mod].shape[1] == p.shape[1]]
            if mats:
                self.a_names.append(mod)
                self.a_params.append(p)
                self.a_prev.append(torch.cat(mats).to(p.device))
        if self.config.previous and not self.a_params:
            raise ForgetlessError("mitigations.olora.previous: the earlier adapters adapt none of this "
                                  "adapter's layers")
        self.extra_bytes = tensor_bytes(self.a_prev)
        self.notes.update({"previous_adapters": len(self.prev_mats), "constrained_modules": len(self.a_params),
                           "overlap_start": self.overlap()})

    def current(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().float() for n, p in zip(self.a_names, self.a_params, strict=True)}

    def overlap(self) -> float | None:
        v = (subspace_overlap(self.current(), [{n: a for n, a in zip(self.a_names, self.a_prev, strict=True)}])
             if self.a_params else None)
        return None if v is None or v != v else round(v, 6)

    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for p, prev in zip(self.a_params, self.a_prev, strict=True):
            total += (p.detach().float() @ prev.T).pow(2).sum().double().cpu() * self.config.weight / 2
        if self.config.l2:
            total += sum(p.detach().float().pow(2).sum().double().cpu() for p in self.all_params) * self.config.l2 / 2
        return total

    def penalty_tensor(self) -> torch.Tensor:
        """The penalty as a differentiable tensor (tests check its gradient against penalty_grad)."""
        terms = [(p @ prev.T).pow(2).sum() * self.config.weight / 2
                 for p, prev in zip(self.a_params, self.a_prev, strict=True)]
        if self.config.l2:
            terms += [p.pow(2).sum() * self.config.l2 / 2 for p in self.all_params]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    @torch.no_grad()
    def penalty_grad(self) -> None:
        if self.config.weight:
            for p, prev in zip(self.a_params, self.a_prev, strict=True):
                if p.grad is not None:
                    p.grad.add_((p.detach() @ prev.T) @ prev, alpha=self.config.weight)
        if self.config.l2:
            params = [p for p in self.all_params if p.grad is not None]
            if params:
                grads = cast("list[torch.Tensor]", [p.grad for p in params])  # params: those with a gradient
                torch._foreach_add_(grads, [p.detach() for p in params], alpha=self.config.l2)

    def finish(self, ctx: TrainContext) -> None:
        self.notes["overlap_end"] = self.overlap()
