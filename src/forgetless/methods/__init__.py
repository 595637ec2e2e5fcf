"""Training methods: one file each (full, PEFT methods, bottleneck adapters, freezing), chosen by `method:`.

Every module of this package is imported here and registers its method with `@register` (see `base.py`): a new
method is one new file. Methods from other installed packages register through the `forgetless.methods` entry
point group. The recipe's `method:` schema is built from the registry when this package is first imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Union

from pydantic import Field

from ..plugins import discover
from .base import REGISTRY, TrainingMethod, WrapContext, register

_HELPERS = {"base", "bottleneck"}  # modules of this package that define no method


discover(__name__, __path__, _HELPERS, "forgetless.methods")

_ORDER = ("full", "lora", "dora", "qlora", "ia3", "prefix", "prompt", "adapter", "freeze")
METHODS: dict[str, type[TrainingMethod]] = {
    n: REGISTRY[n] for n in sorted(REGISTRY, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
}
METHOD_NAMES = tuple(METHODS)
if TYPE_CHECKING:  # the type checker sees the base class; at run time: the union of the registered methods
    MethodConfig = TrainingMethod
else:
    MethodConfig = Annotated[Union[tuple(METHODS.values())], Field(discriminator="name")]  # noqa: UP007


def lora_like_methods() -> list[str]:
    return [n for n, c in METHODS.items() if c.lora_like]


__all__ = ["METHODS", "METHOD_NAMES", "REGISTRY", "MethodConfig", "TrainingMethod", "WrapContext", "lora_like_methods",
           "register"]
