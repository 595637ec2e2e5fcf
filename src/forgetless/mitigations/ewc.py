"""ewc: Elastic Weight Consolidation (Kirkpatrick et al. 2017), with online accumulation (Schwarz et al. 2018).

Before training, the diagonal Fisher information F of the trainable parameters is estimated on N samples
of a reference set (the base model's own answers to general prompts by default, or any data set), with
labels from the data (empirical Fisher) or sampled from the model (true Fisher). Training then adds
weight/2 * sum F (theta - theta0)^2. F is cached on disk by model fingerprint + data hash + N + label mode,
so it is computed once. With `previous:` the Fisher saved by earlier runs (ewc_state.safetensors) is
added in, decayed by `gamma` (online EWC for a sequence of runs).

With several processes (DDP) the N samples are split across the ranks (every world_size-th one each), each
rank sums its squared gradients, and the sums are all-reduced: every rank holds the same Fisher, equal to
the single-process estimate on the same samples up to float summation order. With `labels: sampled` rank 0
computes it alone (the label draws are one random stream) and broadcasts it. Rank 0 picks the samples,
reads or writes the cache, and writes ewc_state.safetensors.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from safetensors.torch import load_file

from .. import distributed as dist
from ..config import DataConfig
from ..errors import ForgetlessError
from ..io import save_safetensors
from ..schema import Strict
from .base import CarryStep, QuadraticPenalty, TrainContext, file_backed, register, tensor_bytes
from .data import examples_from, sample, self_reference_examples

STATE_FILE = "ewc_state.safetensors"


class EWCConfig(Strict):
    name: Literal["ewc"] = "ewc"
    weight: float = Field(1000.0, ge=0, description="lambda: strength of the penalty.")
    samples: int = Field(200, gt=0, description="Reference samples used to estimate the Fisher.")
    reference: Literal["self"] | DataConfig = Field(
        "self",
        description="self: the base model's answers to built-in general prompts; or a data set (train:, format:)."
    )
    labels: Literal["data", "sampled"] = Field("data",
                                               description="Empirical Fisher (data labels) or true Fisher (sampled).")
    normalize: Literal["none", "max", "mean"] = Field("none", description="Scale F so its max or mean is 1.")
    previous: list[str] = Field(default_factory=list,
                                description="ewc_state.safetensors files (or run dirs) of earlier runs.")
    gamma: float = Field(1.0, ge=0, le=1, description="Decay of previous Fishers (online EWC).")
    seed: int = Field(0, description="Seed of the reference sample (and of sampled labels).")
    clip: bool = Field(False, description="Add the penalty's gradient before the Trainer clips gradients (clipped "
                       "with the task gradient, counted in grad_norm); default: after clipping, at full strength.")


def fisher_diag(
    params: list[torch.nn.Parameter], losses: Iterable[Callable[[], torch.Tensor]], all_reduce: bool = False
) -> list[torch.Tensor]:
    """Mean over samples of the squared gradient of each sample's loss (negative log-likelihood).

    all_reduce: `losses` are this rank's share of the samples; the sums and the sample count are added up
    over all ranks before dividing, so every rank returns the mean over all samples (a no-op in one process)."""
    fisher = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    n: int | float = 0
    for loss_fn in losses:
        grads = torch.autograd.grad(loss_fn(), params, allow_unused=True)
        for f, g in zip(fisher, grads, strict=True):
            if g is not None:
                f.add_(g.detach().float().pow(2))
        n += 1
    if all_reduce:
        n = dist.all_reduce_sum_(fisher, n)
    if n == 0:
        raise ForgetlessError("ewc: no reference samples to estimate the Fisher from")
    return [f / n for f in fisher]


def lm_sample_losses(model, examples: list[dict], labels: str, bf16: bool,
                     seed: int) -> Iterable[Callable[[], torch.Tensor]]:
    """One closure per example: its mean token NLL, on the data's labels or on labels sampled from the model."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]], device=device)
        lab = torch.tensor([ex["labels"]], device=device)

        def loss_fn(ids=ids, lab=lab) -> torch.Tensor:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                logits = model(input_ids=ids).logits[0, :-1].float()
            target = lab[0, 1:]
            mask = target != -100
            if labels == "sampled":
                with torch.no_grad():
                    probs = torch.softmax(logits[mask], -1).cpu()
                    target = target.clone()
                    target[mask] = torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(device)
            return torch.nn.functional.cross_entropy(logits[mask], target[mask])

        yield loss_fn


def _state_path(p: str) -> Path:
    path = Path(p)
    return path / STATE_FILE if path.is_dir() else path


@register(EWCConfig)
class EWC(QuadraticPenalty):
    name = "ewc"
    deepspeed_why = ("DeepSpeed ZeRO keeps gradients in its own partitioned buffers, not in .grad, where the penalty "
                     "adds its gradient")
    collective_setup = True  # set-up runs on every rank at once (the Fisher is shared out and all-reduced)
    carry_fills = ("reference", "previous")

    @classmethod
    def carry(cls, options: dict[str, Any], step: CarryStep) -> dict[str, Any] | None:
        """From step 2: the Fisher of the previous task's data (its training split), added to the accumulated
        Fisher of the tasks before it (step i-1's saved state covers tasks 1..i-2; decayed by gamma)."""
        if step.index < 2:
            return None
        ref = {**step.previous_data[-1], "validation": None, "validation_fraction": 0.0, "self_distill": None}
        return {"name": cls.name, **options, "reference": ref,
                "previous": [str(step.previous[-1])] if step.index >= 3 else []}

    def _cache_key(self, ctx: TrainContext, examples: list[dict]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps({"model": ctx.fingerprint(), "n": self.config.samples, "labels": self.config.labels,
                             "seed": self.config.seed, "bf16": ctx.bf16}).encode())
        for ex in examples:
            h.update(json.dumps([ex["input_ids"], ex["labels"]]).encode())
        return h.hexdigest()[:24]

    def setup(self, ctx: TrainContext) -> None:
        cfg = self.config
        named = ctx.trainable()
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]

        def pick() -> tuple[list[dict], Path, bool]:
            if cfg.reference == "self":
                examples = self_reference_examples(ctx, cfg.samples, cfg.seed)
            else:
                examples = sample(examples_from(cfg.reference, ctx, "mitigations.ewc.reference"), cfg.samples, cfg.seed)
            cache = ctx.cache_dir / "fisher" / f"{self._cache_key(ctx, examples)}.safetensors"
            return examples, cache, cache.is_file()

        # rank 0 chooses (and, for reference: self, generates) the samples and looks for a cached Fisher
        examples, cache, cached = dist.on_main(pick)
        if cached:
            fisher = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
            if dist.is_main():
                stored = load_file(str(cache))
                fisher = [stored[n].to(p.device) for n, p in named]
            dist.broadcast_tensors_(fisher)
            self.notes["fisher_cached"] = True
        else:
            was_training = ctx.model.training
            ctx.model.eval()  # no dropout in the estimate
            fisher = self._estimate(ctx, examples)
            ctx.model.train(was_training)
            ctx.model.zero_grad(set_to_none=True)
            if dist.is_main():
                save_safetensors({n: f.cpu().contiguous() for n, f in zip(self.names, fisher, strict=True)}, cache)
            self.notes["fisher_cached"] = False
        if cfg.normalize != "none":
            scale = max(float(f.max()) for f in fisher) if cfg.normalize == "max" else (
                sum(float(f.sum()) for f in fisher) / sum(f.numel() for f in fisher))
            fisher = [f / scale for f in fisher] if scale > 0 else fisher
        for prev in cfg.previous:
            state = load_file(str(_state_path(prev)))
            missing = [n for n in self.names if f"fisher.{n}" not in state]
            if missing:
                raise ForgetlessError(f"mitigations.ewc.previous {prev}: no Fisher for {missing[0]} (a run with "
                                      "another method?)")
            fisher = [f + cfg.gamma * state[f"fisher.{n}"].to(f.device)
                      for f, n in zip(fisher, self.names, strict=True)]
        self.weights = file_backed(fisher, ctx.mmap_dir)
        self.anchor = file_backed([p.detach().float() for p in self.params], ctx.mmap_dir)
        self.extra_bytes = tensor_bytes(self.anchor) + tensor_bytes(self.weights)
        self.notes["samples"] = len(examples)

    def _estimate(self, ctx: TrainContext, examples: list[dict]) -> list[torch.Tensor]:
        cfg = self.config
        if dist.world_size() == 1:
            return fisher_diag(self.params, lm_sample_losses(ctx.model, examples, cfg.labels, ctx.bf16, cfg.seed))
        if cfg.labels == "data":  # each rank its share of the samples; the sums all-reduced
            mine = dist.shard(examples)
            self.notes["fisher_samples_per_rank"] = len(mine)
            return fisher_diag(self.params, lm_sample_losses(ctx.model, mine, cfg.labels, ctx.bf16, cfg.seed),
                               all_reduce=True)
        # sampled labels are one random stream over the samples in order: rank 0 draws them all, as one process would
        fisher = [torch.zeros_like(p, dtype=torch.float32) for p in self.params]
        if dist.is_main():
            fisher = fisher_diag(self.params, lm_sample_losses(ctx.model, examples, cfg.labels, ctx.bf16, cfg.seed))
        return dist.broadcast_tensors_(fisher)

    def finish(self, ctx: TrainContext) -> None:
        """Save the accumulated Fisher and the final weights: the next run's `previous:` (gathered whole from the
        shards under FSDP2, on every rank; rank 0 writes)."""
        if self.weights is None:
            raise RuntimeError("ewc: finish() before setup(): no Fisher to save")
        fisher = self.whole(self.weights)
        theta = self.whole([dist.local(p.detach()).float() for p in self.params])
        if not dist.is_main():
            return
        state = {f"fisher.{n}": f.cpu().contiguous() for n, f in zip(self.names, fisher, strict=True)}
        state.update({f"theta.{n}": t.cpu().contiguous() for n, t in zip(self.names, theta, strict=True)})
        save_safetensors(state, ctx.run_dir / STATE_FILE)
