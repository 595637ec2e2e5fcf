"""si: Synaptic Intelligence (Zenke et al. 2017).

Along a run's training path each parameter's contribution to the loss decrease is accumulated,
omega += -g * delta_theta per optimizer step; at the end the importance is
Omega = omega / (total_change^2 + damping), added to any previous importance, and saved with the final
weights in si_state.safetensors. A following run with `previous:` pointing at that file (or its run
directory) is regularised by weight/2 * sum Omega (theta - theta_previous_end)^2 (`anchor: start`: toward
this run's starting weights instead).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file

from .. import distributed as dist
from ..errors import ForgetlessError
from ..io import save_safetensors
from ..schema import Strict
from .base import CarryStep, QuadraticPenalty, TrainContext, file_backed, register, tensor_bytes

STATE_FILE = "si_state.safetensors"


def _whole(t: torch.Tensor) -> torch.Tensor:
    return t


class SIConfig(Strict):
    name: Literal["si"] = "si"
    weight: float = Field(1.0, ge=0, description="c: strength of the penalty from previous importance.")
    damping: float = Field(1e-3, gt=0, description="xi in Omega = omega / (delta^2 + xi).")
    previous: str | None = Field(None, description="si_state.safetensors (or the run directory) of an earlier run.")
    save: bool = Field(True, description="Accumulate this run's importance and save it for the next run.")
    anchor: Literal["previous", "start"] = Field(
        "previous",
        description="Where the penalty pulls toward: the weights saved with the previous importance (the earlier "
        "run's end), or this run's starting weights. The same when a run starts from the earlier run's model; `start` "
        "is the right anchor when each run trains a fresh adapter on merged weights (forgetless continual with LoRA).",
    )


@register(SIConfig)
class SI(QuadraticPenalty):
    name = "si"
    deepspeed_why = ("DeepSpeed ZeRO keeps gradients in its own partitioned buffers, not in .grad, where the penalty "
                     "adds its gradient")
    carry_fills = ("previous", "anchor")

    @classmethod
    def carry(cls, options: dict[str, Any], step: CarryStep) -> dict[str, Any]:
        """Every step accumulates importance; from step 2 the previous step's importance regularises, anchored at
        the step's start: the previous model (full weights), or "no change" for a fresh adapter on merged weights."""
        return {"name": cls.name, **options, "previous": str(step.previous[-1]) if step.index >= 2 else None,
                "anchor": "start"}

    def __init__(self, config: SIConfig):
        super().__init__(config)
        self.prev_importance: list[torch.Tensor] | None = None

    def setup(self, ctx: TrainContext) -> None:
        named = ctx.trainable()
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        mapped = ctx.mmap_dir
        self.start = file_backed([p.detach().float() for p in self.params], mapped)
        self.omega = [torch.zeros_like(s) for s in self.start] if self.config.save else []
        # per-step scratch (the gradient and the weights before the optimizer step), allocated once
        self._before = [torch.empty_like(s) for s in self.start] if self.config.save else []
        self._grads = [torch.empty_like(s) for s in self.start] if self.config.save else []
        self._has_grad: list[bool] = []
        if self.config.previous:
            path = Path(self.config.previous)
            state = load_file(str(path / STATE_FILE if path.is_dir() else path))
            missing = [n for n in self.names if f"importance.{n}" not in state]
            if missing:
                raise ForgetlessError(f"mitigations.si.previous {path}: no importance for {missing[0]} (a run with "
                                      "another method?)")
            self.prev_importance = file_backed([state[f"importance.{n}"].to(p.device) for n, p in named], mapped)
            self.anchor = (self.start if self.config.anchor == "start"
                           else file_backed([state[f"theta.{n}"].to(p.device) for n, p in named], mapped))
            self.weights = self.prev_importance
        # start, and with save: the path integral and the two scratch buffers; a previous run's importance and end
        # weights
        self.extra_bytes = tensor_bytes(self.start) * (4 if self.config.save else 1) + (
            tensor_bytes(self.prev_importance) * (1 if self.config.anchor == "start" else 2) if self.prev_importance
            else 0)

    def bind(self, model: torch.nn.Module) -> None:
        """Under FSDP2: the path integral, its start and scratch buffers, and any previous importance become this
        rank's slices (sliced as the parameters are)."""
        start_is_anchor = self.anchor is self.start
        super().bind(model)
        if not self.sharded:
            return
        self.start = [dist.shard_like(t, p) for t, p in zip(self.start, self.params, strict=True)]
        if start_is_anchor:
            self.anchor = self.start
        if self.prev_importance is not None:
            self.prev_importance = self.weights  # the same tensors, sliced by QuadraticPenalty.bind
        if self.config.save:
            self.omega = [torch.zeros_like(t) for t in self.start]
            self._before = [torch.empty_like(t) for t in self.start]
            self._grads = [torch.empty_like(t) for t in self.start]

    @torch.no_grad()
    def observe_step(self, phase: str) -> None:
        if not self.config.save:
            return
        local = dist.local if self.sharded else _whole  # this rank's slice under FSDP2
        if phase == "before":
            self._has_grad = [p.grad is not None for p in self.params]
            for g, b, p in zip(self._grads, self._before, self.params, strict=True):
                if p.grad is not None:
                    g.copy_(local(p.grad.detach()))
                b.copy_(local(p.detach()))
            return
        # omega -= g * (theta_after - theta_before), in place: before <- before - after, omega += g * before
        for w, g, b, p, has in zip(self.omega, self._grads, self._before, self.params, self._has_grad, strict=True):
            if has:
                b.sub_(local(p.detach()))
                w.addcmul_(g, b)
        self._has_grad = []

    def importance(self) -> list[torch.Tensor]:
        imp = [w.clamp_min(0) / ((dist.local(p.detach()).float() - s).pow(2) + self.config.damping)
               for w, p, s in zip(self.omega, self.params, self.start, strict=True)]
        if self.prev_importance is not None:
            imp = [a + b for a, b in zip(imp, self.prev_importance, strict=True)]
        return imp

    def finish(self, ctx: TrainContext) -> None:
        if not self.config.save:
            return
        importance = self.whole(self.importance())  # gathered from the shards under FSDP2 (every rank)
        theta = self.whole([dist.local(p.detach()).float() for p in self.params])
        if not dist.is_main():
            return
        state = {f"importance.{n}": t.cpu().contiguous() for n, t in zip(self.names, importance, strict=True)}
        state.update({f"theta.{n}": t.cpu().contiguous() for n, t in zip(self.names, theta, strict=True)})
        save_safetensors(state, ctx.run_dir / STATE_FILE)  # atomic, and readable as the run folder is
