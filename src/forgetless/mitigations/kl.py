"""kl: keep the model's next-token distributions close to the base model's (LwF / self-distillation).

loss += weight * T^2 * KL(p_base^T || p_model^T), averaged over the scored positions of the batch
(`positions: all` tokens, or `target` tokens only) and over the examples selected by `on:` (every
batch, the task examples, or only replay examples mixed in by a replay mitigation). With several processes the
average is over the positions of every process's micro-batch (the counts are all-reduced), as one process with
the whole batch takes it.
For PEFT methods the base distribution comes from the same model with its adapters disabled (no second
copy in memory); for full fine-tuning from a frozen copy of the starting weights (bf16 when training
computes in bf16, else fp32).

Under FSDP2 the frozen copy is sharded as the trained model is (each rank keeps its slice), and the base forward,
a collective then, runs on every rank for every micro-batch, also where `on:` selects no example of it.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, cast

import torch
from pydantic import Field

from .. import distributed as dist
from ..schema import Strict
from .base import REGISTRY, CarryStep, Mitigation, TrainContext, register, tensor_bytes


class KLConfig(Strict):
    name: Literal["kl"] = "kl"
    weight: float = Field(1.0, ge=0, description="Weight of the KL term.")
    temperature: float = Field(1.0, gt=0, description="T: both distributions are softened by T (the term is "
                               "scaled by T^2).")
    on: Literal["all", "task", "replay"] = Field("all", description="Which examples of each batch the term covers.")
    positions: Literal["all", "target"] = Field("all", description="All non-padding tokens, or only the loss targets.")


def kl_to_base(base_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * mean over masked positions of KL(softmax(base/T) || softmax(logits/T))."""
    t = temperature
    lp = torch.log_softmax(logits.float() / t, -1)
    lq = torch.log_softmax(base_logits.float() / t, -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    n = mask.sum().clamp_min(1)
    return (kl * mask).sum() / n * t * t


@register(KLConfig)
class KL(Mitigation):
    name = "kl"
    deepspeed_why = "not made to work with DeepSpeed ZeRO's partitioned weights (the frozen copy, disabled adapters)"
    sharded = False

    @classmethod
    def check_recipe(cls, config: KLConfig, recipe: Any) -> None:
        if config.on == "replay" and not any(REGISTRY[m.name].marks_replay for m in recipe.mitigations):
            marks = sorted(n for n, c in REGISTRY.items() if c.marks_replay)
            raise ValueError(f"mitigations.kl.on: replay needs a {' or '.join(marks)} mitigation")

    @classmethod
    def carry(cls, options: dict[str, Any], step: CarryStep) -> dict[str, Any] | None:
        """Every step, toward that step's starting model; `on: replay` only in steps with replayed examples."""
        if options.get("on") == "replay" and not step.buffer:
            return None
        return {"name": cls.name, **options}

    def setup(self, ctx: TrainContext) -> None:
        self.peft = hasattr(ctx.model, "disable_adapter")
        self.frozen = None
        if not self.peft:
            self.frozen = copy.deepcopy(ctx.model).to(torch.bfloat16 if ctx.bf16 else torch.float32).eval()
            for p in self.frozen.parameters():
                p.requires_grad_(False)
            self.extra_bytes = tensor_bytes(list(self.frozen.parameters()))
        self.bf16 = ctx.bf16

    def bind(self, model: torch.nn.Module) -> None:
        """Under FSDP2: shard the frozen copy module by module as the trained model is sharded (same mesh)."""
        sharded = [p for p in model.parameters() if dist.is_sharded(p)]
        if not sharded:
            return
        self.sharded = True
        if self.frozen is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        mesh = cast(Any, sharded[0]).device_mesh
        # the trained model's FSDP units: modules sharded together share one state (accelerate groups the tied
        # embedding and head with the final norm); shard the copy's same modules together, inner units first
        units: dict[int, list[str]] = {}
        for n, m in model.named_modules():
            if isinstance(m, FSDPModule):
                units.setdefault(id(cast(Any, m)._get_fsdp_state()), []).append(n)
        for names in sorted(units.values(), key=lambda ns: ("" in ns, -min(n.count(".") for n in ns))):
            mods = [self.frozen.get_submodule(n) if n else self.frozen for n in names]
            fully_shard(mods if len(mods) > 1 else mods[0], mesh=mesh)
        self.extra_bytes = tensor_bytes([dist.local(p) for p in self.frozen.parameters()])

    @torch.no_grad()
    def _base_logits(self, model, inputs: dict[str, Any]) -> torch.Tensor:
        fwd = {k: inputs[k] for k in ("input_ids", "attention_mask") if k in inputs}
        device = inputs["input_ids"].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.bf16):
            if self.frozen is not None:
                return self.frozen(**fwd).logits
            with model.disable_adapter():
                return model(**fwd).logits

    def loss(self, model, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        if self.config.weight == 0:
            return None
        unwrapped = model.module if hasattr(model, "module") else model
        # sharded, the base forward is a collective: every rank runs it, whatever its batch selects
        base = self._base_logits(unwrapped, inputs) if self.sharded else None
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids)).float()
        if self.config.positions == "target" and "labels" in inputs:
            nxt = torch.zeros_like(mask)
            nxt[:, :-1] = (inputs["labels"][:, 1:] != -100).float()  # position t predicts token t+1
            mask = mask * nxt
        replay = inputs.get("replay_mask")
        if self.config.on != "all":
            sel = replay.float() if replay is not None else torch.zeros(ids.shape[0], device=ids.device)
            sel = sel if self.config.on == "replay" else 1 - sel
            mask = mask * sel[:, None]
        scale = 1.0
        if dist.world_size() > 1:
            # the mean over every rank's positions, as one process with the whole batch takes it: the ranks'
            # gradients are averaged, so each rank's sum is divided by the global count, times the ranks
            count = mask.sum().detach().double().cpu().reshape(1)
            local_n = float(count.item())
            dist.all_reduce_sum_([count])
            if local_n == 0:
                return None
            scale = dist.world_size() * local_n / float(count.item())
        if mask.sum() == 0:
            return None
        if base is None:
            base = self._base_logits(unwrapped, inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs["logits"]
        logits = logits[:, logits.shape[1] - base.shape[1] :]  # prompt tuning prepends virtual tokens
        return self.config.weight * scale * kl_to_base(base, logits, mask, self.config.temperature)
