"""Mitigations against forgetting: one file each, composed in the recipe's `mitigations:` list."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

from .base import Mitigation, MitigationCallback, TrainContext, loss_term
from .ewc import EWC, EWCConfig
from .freeze import Freeze, FreezeConfig
from .kl import KL, KLConfig
from .l2sp import L2SP, L2SPConfig
from .olora import OLoRA, OLoRAConfig
from .replay import Replay, ReplayConfig
from .self_replay import SelfReplay, SelfReplayConfig
from .si import SI, SIConfig

MitigationConfig = Annotated[
    L2SPConfig | EWCConfig | SIConfig | KLConfig | ReplayConfig | SelfReplayConfig | FreezeConfig | OLoRAConfig,
    Field(discriminator="name"),
]
MITIGATIONS: dict[str, type[Mitigation]] = {
    "l2sp": L2SP, "ewc": EWC, "si": SI, "kl": KL, "replay": Replay, "self_replay": SelfReplay, "freeze": Freeze,
    "olora": OLoRA,
}
MITIGATION_NAMES = tuple(MITIGATIONS)


def build(configs: list[Any]) -> list[Mitigation]:
    # freezing first: every other mitigation then sees the final set of trainable parameters
    ordered = sorted(configs, key=lambda c: c.name != "freeze")
    return [MITIGATIONS[c.name](c) for c in ordered]


__all__ = ["MITIGATIONS", "MITIGATION_NAMES", "Mitigation", "MitigationCallback", "MitigationConfig", "TrainContext",
           "build", "loss_term"]
