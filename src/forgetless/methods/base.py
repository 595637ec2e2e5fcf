"""The protocol every training method follows (full fine-tuning, PEFT methods, bottleneck adapters, freezing).

A method is one file in this package: a pydantic config (its recipe options under `method:`, with
`name: Literal["..."]`) registered with `@register`, whose class attributes declare what it is and whose methods
build it:

- `default_lr`: the learning rate when `optim.lr` is not set;
- `peft`: the run saves an adapter (PEFT or bottleneck), not full weights;
- `can_merge()`: the adapter folds into the base weights as a plain HF model (`mergeable` by default);
- `shardable`: runs under FSDP / DeepSpeed (else the recipe is refused there);
- `lora_like`: its adapters are LoRA matrices (lora_A / lora_B): O-LoRA's penalty and merge's scaled adapter;
- `quantization(compute_dtype)`: a transformers quantization config to load the base with (QLoRA), or None;
- `wrap(model, ctx)`: make the loaded base model trainable for the method (trainable weights end up fp32); `ctx`
  (WrapContext) holds the model path, device, tokenizer and, for data-driven inits, calibration examples;
- `peft_config(model_path)`: the PEFT config, for methods built by `peft.get_peft_model`;
- `export_files(out_dir, bf16)`: extra files saved beside the final adapter (QLoRA's quantization settings);
- `merge_full_precision`: merging reloads the base in full precision first (QLoRA: never merge into 4 bits).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from ..schema import Strict


@dataclass
class WrapContext:
    """What a method may use to build itself."""

    model_path: str
    device: torch.device
    gradient_checkpointing: bool = False
    tokenizer: Any = None
    #: Tokenized examples ({input_ids, labels}) to calibrate a data-driven init on: (a data section, or None for
    #: the run's training data; how many) -> examples. None where no data is at hand.
    calibration: Callable[[Any, int], list[dict[str, Any]]] | None = None


class TrainingMethod(Strict):
    """Base config of a method; subclasses add `name: Literal[...]` and their options."""

    if TYPE_CHECKING:  # declared by every subclass (name: Literal["..."] = "...")
        name: str

    default_lr: ClassVar[float] = 2e-5
    peft: ClassVar[bool] = True
    mergeable: ClassVar[bool] = True
    shardable: ClassVar[bool] = False
    lora_like: ClassVar[bool] = False
    merge_full_precision: ClassVar[bool] = False
    unmergeable_why: ClassVar[str] = "it adds virtual tokens, not weight deltas"

    @property
    def moves_base(self) -> bool:
        """Part of the base weights lives in the adapter (PiSSA-like inits): disabling it is not the base model."""
        return False

    def can_merge(self) -> bool:
        """Whether the trained result can be folded into the base weights as a plain HF model."""
        return self.mergeable

    def quantization(self, compute_dtype: torch.dtype) -> Any:
        return None

    def peft_config(self, model_path: str) -> Any:
        raise NotImplementedError(f"method {getattr(self, 'name', '?')!r} is not built by peft")

    def wrap(self, model: nn.Module, ctx: WrapContext) -> nn.Module:
        """Default: a PEFT model from `peft_config`."""
        from peft import get_peft_model

        with warnings.catch_warnings():  # peft reads transformers 5's deprecated is_gradient_checkpointing
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
            return get_peft_model(model, self.peft_config(ctx.model_path))

    def export_files(self, out_dir: Path, bf16: bool) -> None:
        pass


#: Every registered method by its recipe name.
REGISTRY: dict[str, type[TrainingMethod]] = {}


def register(cls: type[TrainingMethod]) -> type[TrainingMethod]:
    """Class decorator: makes `method: {name: <its name>, ...}` valid in recipes."""
    tag = cls.model_fields["name"].default
    if tag in REGISTRY and REGISTRY[tag] is not cls:
        raise TypeError(f"method {tag!r} registered twice ({REGISTRY[tag].__module__} and {cls.__module__})")
    REGISTRY[tag] = cls
    return cls
