"""Finding a transformer's list of decoder blocks (for `method: freeze` and the freeze mitigation)."""

from __future__ import annotations

from torch import nn

from .errors import ForgetlessError


def find_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer's list of decoder blocks (the longest ModuleList)."""
    best: nn.ModuleList | None = None
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and (best is None or len(m) > len(best)):
            best = m
    if best is None:
        raise ForgetlessError("cannot find the model's transformer blocks (no nn.ModuleList)")
    return best
