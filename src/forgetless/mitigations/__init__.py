"""Mitigations against forgetting: one file each, composed in the recipe's `mitigations:` list.

Every module of this package is imported here, and each registers its mitigation with `@register` (see
`base.py`): a new mitigation is one new file, nothing else to edit. Mitigations from other installed packages
register through the `forgetless.mitigations` entry point group (the entry point names a module to import).
The recipe's `mitigations:` schema is built from the registry when this package is first imported.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Union

from pydantic import Field

from ..plugins import discover
from .base import (
    REGISTRY,
    CarryStep,
    Mitigation,
    MitigationCallback,
    MitigationOptions,
    TrainContext,
    loss_term,
    register,
)

_HELPERS = {"base", "data"}  # modules of this package that define no mitigation


discover(__name__, __path__, _HELPERS, "forgetless.mitigations")

#: Every mitigation by recipe name, in a fixed order (the built-ins' historical order, then the rest by name).
_ORDER = ("l2sp", "ewc", "si", "kl", "replay", "self_replay", "freeze", "olora")
MITIGATIONS: dict[str, type[Mitigation]] = {
    n: REGISTRY[n] for n in sorted(REGISTRY, key=lambda n: (_ORDER.index(n) if n in _ORDER else len(_ORDER), n))
}
MITIGATION_NAMES = tuple(MITIGATIONS)
_configs = tuple(c.config_model for c in MITIGATIONS.values())
if TYPE_CHECKING:  # the type checker sees what every config offers; at run time: the union of the registered ones
    MitigationConfig = MitigationOptions
else:
    MitigationConfig = Annotated[Union[_configs], Field(discriminator="name")]  # noqa: UP007


def build(configs: list[Any]) -> list[Mitigation]:
    # freezing first: every other mitigation then sees the final set of trainable parameters
    ordered = sorted(configs, key=lambda c: c.name != "freeze")
    return [MITIGATIONS[c.name](c) for c in ordered]


__all__ = ["MITIGATIONS", "MITIGATION_NAMES", "REGISTRY", "CarryStep", "Mitigation", "MitigationCallback",
           "MitigationConfig", "TrainContext", "build", "loss_term", "register"]
