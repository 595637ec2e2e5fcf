"""The small protocol every mitigation follows, and the Trainer callback that drives it.

A mitigation is one file in this package: a pydantic config (its recipe options, `name: Literal["..."]`) and
a class registered with `@register`, which points at the config (`config = ...`), declares what it needs and
offers (class attributes below), and implements any of these hooks:

- `setup(ctx)`: before training (snapshot weights, estimate a Fisher, freeze parameters, build data);
- `prepare_data(ctx, train)`: change the training examples (replay mixes data in);
- `loss(model, inputs, outputs)`: an extra loss term per micro-batch (KL to the base model);
- `penalty_grad()`: add a quadratic penalty's gradient before the optimizer step (L2-SP, EWC, SI);
  quadratic penalties skip autograd entirely: their gradient lam * F * (theta - theta0) is added with
  fused foreach ops, once per optimizer step (so gradient accumulation does not multiply them);
- `observe_step(phase)`: see the parameters before and after the optimizer step (SI's path integral);
- `bind(model)`: the model as the Trainer trains it, at the start of training (under FSDP2 its parameters are
  sharded DTensors: penalties take them by name and keep their own state sliced like them);
- `finish(ctx)`: after training, on every process (save importances for the next run: gather what is sharded,
  rank 0 writes);
- `guard_action(action, dataset, factor)`: one of the guard's actions this mitigation offers (`guard_actions`);
- `checkpoint_state()` / `restore_state(state)`: tensors a checkpoint keeps beside the weights so that a resumed run
  continues exactly (on-policy self-distillation's EMA teacher); written into the checkpoint folder before it is
  marked complete, given back after `setup` on resume.

Declarations (class attributes, read by the recipe, the distributed checks, the run and the guard):

- `shardable`: works on FSDP2 shards (each rank its slice of every parameter); if not, `unsharded_why` says why
  (the recipe is refused); `deepspeed_why`, when set, why it is refused under DeepSpeed ZeRO;
- `collective_setup`: `setup` runs on every rank at once (it uses collectives); otherwise rank 0 first;
- `guard_actions`: guard actions it carries out (replay: `more_replay`);
- `marks_replay`: the examples it mixes in carry the replay flag (`kl: {on: replay}` needs one such);
- `carry(options, step)`: what it hands to the next step of a `forgetless continual` sequence (the sequence's
  `carry:` list holds ordinary configs of this mitigation; `carry` fills what only the sequence knows, such as
  the previous step's run directory). Not overridden: it cannot be carried.

When the penalty gradients are added: by default after the Trainer clips gradients (`optim.max_grad_norm`), so
an anchor is never scaled down by a large task gradient, and the logged `grad_norm` is the task's alone (KL, a
loss term, is clipped with the task loss). `clip: true` on l2sp / ewc adds theirs before clipping instead:
clipped together with the task gradient and counted in `grad_norm`. SI always adds its own after clipping (its
path integral reads the clipped gradient before SI's penalty is added; with l2sp / ewc `clip: true` beside it,
that gradient includes their penalties).

Each mitigation's set-up time, time inside its hooks and the memory it holds are reported in summary.json.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, cast

import torch
from torch import nn
from transformers import TrainerCallback

from .. import distributed as dist
from ..fingerprint import fingerprint_model
from ..io import save_safetensors


class MitigationOptions(Protocol):
    """For the type checker: what every registered mitigation's config (a pydantic model) offers. At run time a
    recipe's `mitigations:` entries are the discriminated union of the registered config models."""

    @property
    def name(self) -> str: ...

    def model_dump(self, *, mode: str = ..., exclude: set[str] | None = ...) -> dict[str, Any]: ...


@dataclass
class TrainContext:
    """What a mitigation may use during set-up."""

    recipe: Any
    model: nn.Module
    tokenizer: Any
    run_dir: Path
    device: torch.device
    base_model_path: str
    bf16: bool
    data: Any  # forgetless.data.Datasets
    cache_dir: Path
    info: dict[str, Any] = field(default_factory=dict)
    _fingerprint: str | None = None

    def fingerprint(self) -> str:
        """Hash of the model's weights at set-up (the cache key for Fishers and self-generated data)."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_model(self.model)
        return self._fingerprint

    @property
    def mmap_dir(self) -> Path | None:
        """Where file_backed() puts its (immediately unlinked) files."""
        return self.cache_dir / "mmap" if self.cache_dir is not None else None

    def trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]


@dataclass
class CarryStep:
    """What a carried mitigation may know about the step of a continual sequence it is configured for."""

    index: int  # 1-based
    previous: list[Path]  # run directories of the steps before, in order
    previous_data: list[dict[str, Any]]  # their recipes' data sections (JSON form), in order
    buffer: list[dict[str, Any]]  # the replay buffer's data configs (earlier tasks' kept examples), if any


class Mitigation:
    """Base class: every hook is optional."""

    name: ClassVar[str] = "mitigation"
    config_model: ClassVar[type[Any]] = object  # the pydantic config (set by register)
    shardable: ClassVar[bool] = True
    unsharded_why: ClassVar[str] = ""
    deepspeed_why: ClassVar[str] = ""  # non-empty: refused under DeepSpeed ZeRO, for this reason
    collective_setup: ClassVar[bool] = False
    guard_actions: ClassVar[tuple[str, ...]] = ()
    marks_replay: ClassVar[bool] = False
    #: Config keys a continual sequence fills when it carries this mitigation (a user may not set them in carry:).
    carry_fills: ClassVar[tuple[str, ...]] = ()
    #: Defaults that differ when carried (the options a carry: entry gets unless it sets them).
    carry_defaults: ClassVar[dict[str, Any]] = {}
    #: Add the penalty gradient before the Trainer clips (the config's `clip`); see the module docstring.
    clip_penalty: bool = False

    def __init__(self, config: Any):
        self.config = config
        self.clip_penalty = bool(getattr(config, "clip", False))
        self.setup_s = 0.0
        self.hook_s = 0.0
        self.extra_bytes = 0
        self.notes: dict[str, Any] = {}

    def setup(self, ctx: TrainContext) -> None:
        pass

    def prepare_data(self, ctx: TrainContext, train: list[dict]) -> list[dict]:
        return train

    def loss(self, model: nn.Module, inputs: dict[str, Any], outputs: Any) -> torch.Tensor | None:
        return None

    def penalty_grad(self) -> None:
        pass

    def observe_step(self, phase: str) -> None:
        pass

    def bind(self, model: nn.Module) -> None:
        pass

    def finish(self, ctx: TrainContext) -> None:
        pass

    def checkpoint_state(self) -> dict[str, torch.Tensor] | None:
        """Tensors a checkpoint keeps so that a resumed run continues exactly (an EMA teacher); None: nothing."""
        return None

    def restore_state(self, state: dict[str, torch.Tensor]) -> None:
        """Take back what checkpoint_state saved (called after setup, when the run resumes from a checkpoint)."""

    def guard_action(self, action: str, dataset: list[dict], factor: float) -> dict[str, Any]:
        """Carry out one of `guard_actions` mid-run; returns the details for the guard's event."""
        raise NotImplementedError(f"{self.name} offers no guard action {action!r}")

    @classmethod
    def check_recipe(cls, config: Any, recipe: Any) -> None:
        """Refuse (ValueError, naming the key) a recipe this mitigation cannot run in; called on validation."""

    @classmethod
    def carry(cls, options: dict[str, Any], step: CarryStep) -> dict[str, Any] | None:
        """The config (a mapping, validated with the step's recipe) for step `step`, or None to skip that step."""
        raise NotImplementedError

    @classmethod
    def carryable(cls) -> bool:
        return cls.carry.__func__ is not Mitigation.carry.__func__  # type: ignore[attr-defined]

    @classmethod
    def carry_buffer(cls, options: dict[str, Any]) -> dict[str, Any] | None:
        """A carried mitigation that replays earlier tasks' examples says which to keep (policy, per_task, size,
        seed); the sequence builds the buffer and passes it in `CarryStep.buffer`."""
        return None

    def report(self, train_s: float) -> dict[str, Any]:
        return {
            "name": self.name,
            "setup_s": round(self.setup_s, 3),
            "hook_s": round(self.hook_s, 3),
            "step_time_share": round(self.hook_s / train_s, 4) if train_s > 0 else None,
            "extra_memory_mb": round(self.extra_bytes / 2**20, 2),
            **self.notes,
        }


#: Every registered mitigation by its recipe name.
REGISTRY: dict[str, type[Mitigation]] = {}


def register(config_model: type[Any]) -> Any:
    """Class decorator: `@register(KLConfig) class KL(Mitigation)` makes `mitigations: [{name: kl, ...}]` valid in
    recipes (the config model's `name` literal must equal the class's `name`)."""

    def deco(cls: type[Mitigation]) -> type[Mitigation]:
        tag = config_model.model_fields["name"].default
        if tag != cls.name:
            raise TypeError(f"{cls.__qualname__}: name {cls.name!r} but its config's name is {tag!r}")
        if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
            raise TypeError(f"mitigation {cls.name!r} registered twice ({REGISTRY[cls.name].__module__} and "
                            f"{cls.__module__})")
        if not cls.shardable and not cls.unsharded_why:
            raise TypeError(f"{cls.__qualname__}: shardable = False needs unsharded_why (shown to the user)")
        cls.config_model = config_model
        REGISTRY[cls.name] = cls
        return cls

    return deco


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def file_backed(tensors: list[torch.Tensor], folder: Path | None) -> list[torch.Tensor]:
    """Copies of float32 CPU tensors that live in a memory-mapped file instead of anonymous memory.

    For the frozen per-parameter state a penalty reads every step (the anchor theta0, a Fisher). Measured on
    this project's 2-core VM with a bare PyTorch loop on smollm2-135m (8 x 128 tokens, alternating runs): an
    unused 0.5 GB fp32 copy of the weights in anonymous memory made the steps 10-20% slower (the same number
    of page faults, each one dearer), the same bytes in a file mapping did not. The file is written back at
    once (fsync: left to the kernel's flusher, the writeback lands in the first ~30 s of training and slows
    those steps) and unlinked as soon as it is mapped, so nothing is left on disk; the pages belong to the
    page cache. The mapping is copy-on-write: a write never reaches the file. Other devices and dtypes get
    plain copies (callers pass live parameters: the result must never alias them). `folder` None: the
    system's temporary folder.
    """
    if not tensors or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return [t.detach().clone() for t in tensors]
    import numpy as np

    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="penalty-", suffix=".f32", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            for t in tensors:
                f.write(memoryview(t.detach().contiguous().numpy()).cast("B"))  # type: ignore[arg-type]  # a buffer
            f.flush()
            os.fsync(f.fileno())  # written back now, during set-up, not by the flusher during the first steps
        flat = torch.from_numpy(np.memmap(name, dtype=np.float32, mode="c"))
    finally:
        os.unlink(name)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view(t.shape))
        offset += t.numel()
    return out


class QuadraticPenalty(Mitigation):
    """lam/2 * sum_i w_i (theta_i - anchor_i)^2 over the trainable parameters (w = 1 for L2-SP, the Fisher
    for EWC, the SI importance). Subclasses fill `self.params`, `self.anchor` and `self.weights`."""

    def __init__(self, config: Any):
        super().__init__(config)
        self.names: list[str] = []
        self.params: list[nn.Parameter] = []
        self.anchor: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] | None = None  # None: all ones
        self.lam = float(config.weight)
        self.sharded = False  # FSDP2: params are DTensors; anchor and weights hold this rank's slices

    def bind(self, model: nn.Module) -> None:
        """Under FSDP2 the Trainer replaced the parameters by sharded ones: take them by name, and keep only this
        rank's slice of the anchor and weights (sliced as the parameters are: the penalty needs no communication).
        Without sharding nothing changes."""
        if not self.names:
            return
        named = dict(model.named_parameters())
        if not any(dist.is_sharded(named.get(n)) for n in self.names):
            return
        missing = [n for n in self.names if n not in named]
        if missing:
            raise RuntimeError(f"{self.name}: the sharded model has no parameter {missing[0]}")
        self.params = [named[n] for n in self.names]
        if self.anchor:  # SI without a previous importance has none yet
            self.anchor = [dist.shard_like(a, p) for a, p in zip(self.anchor, self.params, strict=True)]
        if self.weights is not None:
            self.weights = [dist.shard_like(w, p) for w, p in zip(self.weights, self.params, strict=True)]
        self.sharded = True
        self.extra_bytes = tensor_bytes(self.anchor) + (tensor_bytes(self.weights) if self.weights else 0)

    def whole(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """Whole tensors from this rank's slices (a collective under FSDP2: every rank calls it)."""
        if not self.sharded:
            return parts
        return [dist.gather_like(t, p) for t, p in zip(parts, self.params, strict=True)]

    @torch.no_grad()
    def penalty(self) -> torch.Tensor:
        """The penalty's value (for logging and tests); under FSDP2 the slices' sums are all-reduced (every rank
        calls it)."""
        total = torch.zeros((), dtype=torch.float64)
        if not self.anchor:
            return total
        for i, (p, a) in enumerate(zip(self.params, self.anchor, strict=True)):
            d = (dist.local(p.detach()).float() - a).pow(2)
            if self.weights is not None:
                d = d * self.weights[i]
            total += d.sum().double().cpu()
        if self.sharded:
            dist.all_reduce_sum_([total])
        return self.lam / 2 * total

    def penalty_tensor(self) -> torch.Tensor:
        """The penalty as a differentiable tensor (tests check its gradient against penalty_grad)."""
        terms = []
        for i, (p, a) in enumerate(zip(self.params, self.anchor, strict=True)):
            d = (p - a).pow(2)
            terms.append((d * self.weights[i]).sum() if self.weights is not None else d.sum())
        return self.lam / 2 * torch.stack(terms).sum()

    @torch.no_grad()
    def penalty_grad(self) -> None:
        if not self.anchor or self.lam == 0:
            return
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        idx = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = cast("list[torch.Tensor]", [p.grad for p in params])  # params: those with a gradient
        theta, anchor = [p.detach() for p in params], [self.anchor[i] for i in idx]
        if self.sharded:  # each rank its slice of the gradient, the weights, the anchor and the weights
            grads, theta = [dist.local(g) for g in grads], [dist.local(t) for t in theta]
        # grad += lam * w * theta - lam * w * theta0, in place: no temporaries the size of the model (on CPU each
        # one is fresh pages to fault in, every step); fp32 rounding of the two terms is ~1e-7 of lam * w * theta
        if self.weights is None:
            torch._foreach_add_(grads, theta, alpha=self.lam)
            torch._foreach_add_(grads, anchor, alpha=-self.lam)
        else:
            weights = [self.weights[i] for i in idx]
            torch._foreach_addcmul_(grads, weights, theta, value=self.lam)
            torch._foreach_addcmul_(grads, weights, anchor, value=-self.lam)


def state_file(m: Mitigation) -> str:
    return f"mitigation-{m.name}.safetensors"


def save_states(mitigations: list[Mitigation], folder: Path) -> None:
    """Each mitigation's checkpoint_state into a checkpoint folder (safetensors; written before the folder is
    marked complete)."""
    for m in mitigations:
        state = m.checkpoint_state()
        if state:
            save_safetensors({k: v.detach().cpu().contiguous() for k, v in state.items()}, folder / state_file(m))


def load_states(mitigations: list[Mitigation], folder: Path) -> None:
    """Give each mitigation that keeps checkpoint state what `folder` holds of it; a checkpoint without it (saved
    by a recipe without that mitigation) is an error naming the file."""
    from safetensors.torch import load_file

    for m in mitigations:
        if m.checkpoint_state() is None:
            continue
        path = folder / state_file(m)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: the checkpoint has no state of {m.name} to resume from (was it "
                                    "saved by another recipe?)")
        m.restore_state(load_file(str(path)))


class MitigationCallback(TrainerCallback):
    """Drives the per-step hooks; times them per mitigation. ForgetlessTrainer(mitigations=...) installs it."""

    def __init__(self, mitigations: list[Mitigation]):
        self.mitigations = mitigations

    def _timed(self, m: Mitigation, fn, *args) -> None:
        t0 = time.perf_counter()
        fn(*args)
        m.hook_s += time.perf_counter() - t0

    def add_clipped_penalties(self) -> None:
        """The penalties with `clip: true`, before the Trainer clips (ForgetlessTrainer calls this)."""
        for m in self.mitigations:
            if m.clip_penalty:
                self._timed(m, m.penalty_grad)

    def on_train_begin(self, args, state, control, model=None, **kw):
        if model is not None:
            for m in self.mitigations:
                m.bind(model)

    def on_pre_optimizer_step(self, args, state, control, **kw):
        for m in self.mitigations:
            self._timed(m, m.observe_step, "before")
        for m in self.mitigations:
            if not m.clip_penalty:
                self._timed(m, m.penalty_grad)

    def on_optimizer_step(self, args, state, control, **kw):
        for m in self.mitigations:
            self._timed(m, m.observe_step, "after")


def loss_term(m: Mitigation):
    """Wrap a mitigation's loss hook as a timed Trainer loss term."""

    def term(model, inputs, outputs):
        t0 = time.perf_counter()
        out = m.loss(model, inputs, outputs)
        m.hook_s += time.perf_counter() - t0
        return out

    return term
