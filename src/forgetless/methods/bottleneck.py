"""Bottleneck adapters (Houlsby et al. 2019) on the output projections of attention and MLP blocks.

PEFT has no bottleneck adapter, so it lives here: a wrapper around an output projection that adds
`up(act(down(y)))` to its output y, initialised to the identity (up = 0). It saves and loads like a PEFT
adapter (`adapter_model.safetensors` + `forgetless_adapter.json`) and, with `activation: identity`,
merges exactly into the wrapped projection: W' = (I + U D) W.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import ForgetlessError

CONFIG_NAME = "forgetless_adapter.json"
WEIGHTS_NAME = "adapter_model.safetensors"
# output projections of the attention and MLP sub-blocks, by common HF naming
DEFAULT_TARGETS = ("o_proj", "down_proj", "out_proj", "dense_4h_to_h", "c_proj", "fc2", "wo", "w2")
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "identity": nn.Identity}


class BottleneckAdapter(nn.Module):
    """y = base(x); return y + up(dropout(act(down(y))))."""

    def __init__(self, base: nn.Linear, bottleneck: int, activation: str = "gelu", dropout: float = 0.0):
        super().__init__()
        self.base = base
        width = base.out_features
        bias = base.bias is not None
        self.down = nn.Linear(width, bottleneck, bias=bias, dtype=torch.float32, device=base.weight.device)
        self.up = nn.Linear(bottleneck, width, bias=bias, dtype=torch.float32, device=base.weight.device)
        nn.init.normal_(self.down.weight, std=width**-0.5)
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.down.bias)
            nn.init.zeros_(self.up.bias)
        self.act = ACTIVATIONS[activation]()
        self.drop = nn.Dropout(dropout)
        self.activation = activation

    @property
    def weight(self) -> torch.Tensor:  # some HF code inspects `.weight` of projections
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        h = self.up(self.drop(self.act(self.down(y.to(self.down.weight.dtype)))))
        return y + h.to(y.dtype)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The wrapped projection with the (linear) adapter folded in."""
        if self.activation != "identity":
            raise ForgetlessError(
                f"a bottleneck adapter with activation {self.activation!r} is non-linear and cannot be merged; "
                "use activation: identity to merge, or keep the adapter separate"
            )
        w = self.base.weight.float()
        m = torch.eye(w.shape[0], dtype=w.dtype, device=w.device) + self.up.weight.float() @ self.down.weight.float()
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None)
        out = out.to(device=w.device, dtype=self.base.weight.dtype)
        out.weight.copy_((m @ w).to(out.weight.dtype))
        if self.base.bias is not None:
            b = m @ self.base.bias.float() + self.up.weight.float() @ self.down.bias.float() + self.up.bias.float()
            out.bias.copy_(b.to(out.bias.dtype))
        return out


def _targets(model: nn.Module, names: list[str] | None) -> list[str]:
    wanted = tuple(names) if names else DEFAULT_TARGETS
    found = [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in wanted
    ]
    if not found:
        raise ForgetlessError(
            f"method.target_modules: no linear layer named any of {list(wanted)} in this model; "
            "name the attention and MLP output projections explicitly"
        )
    return found


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def add_adapters(
    model: nn.Module, bottleneck: int, activation: str, dropout: float, target_modules: list[str] | None
) -> list[str]:
    """Freeze `model` and wrap its output projections with trainable adapters. Returns wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = _targets(model, target_modules)
    for name in names:  # _targets names linear layers only
        linear = cast(nn.Linear, model.get_submodule(name))
        _set_module(model, name, BottleneckAdapter(linear, bottleneck, activation, dropout))
    model._forgetless_adapter = {  # type: ignore[assignment]  # noqa: SLF001 - recorded for saving
        "bottleneck": bottleneck,
        "activation": activation,
        "dropout": dropout,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in names}),
    }
    return names


def adapter_modules(model: nn.Module) -> dict[str, BottleneckAdapter]:
    return {n: m for n, m in model.named_modules() if isinstance(m, BottleneckAdapter)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in adapter_modules(model).items():
        for sub in ("down", "up"):
            for pname, p in getattr(mod, sub).named_parameters():
                out[f"{name}.{sub}.{pname}"] = p.detach().cpu().contiguous()
    return out


def save_adapters(model: nn.Module, out_dir: str | Path, base_model: str) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(out_dir / WEIGHTS_NAME))
    cfg = {"type": "bottleneck", "base_model_name_or_path": base_model,
           **model._forgetless_adapter}  # type: ignore[dict-item]  # noqa: SLF001 - set by add_adapters
    (out_dir / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")


def load_adapters(model: nn.Module, adapter_dir: str | Path) -> nn.Module:
    adapter_dir = Path(adapter_dir)
    cfg = json.loads((adapter_dir / CONFIG_NAME).read_text())
    add_adapters(model, cfg["bottleneck"], cfg["activation"], 0.0, cfg["target_modules"])
    state = load_file(str(adapter_dir / WEIGHTS_NAME))
    mods = adapter_modules(model)
    for key, tensor in state.items():
        m = re.match(r"(.+)\.(down|up)\.(weight|bias)$", key)
        if not m or m.group(1) not in mods:
            raise ForgetlessError(f"{adapter_dir / WEIGHTS_NAME}: unexpected tensor {key!r} for this model")
        getattr(getattr(mods[m.group(1)], m.group(2)), m.group(3)).data.copy_(tensor)
    return model


def merge_adapters(model: nn.Module) -> nn.Module:
    for name, mod in adapter_modules(model).items():
        _set_module(model, name, mod.merged())
    if hasattr(model, "_forgetless_adapter"):
        del model._forgetless_adapter
    return model


def is_adapter_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def adapter_config(path: str | Path) -> dict[str, Any]:
    return json.loads((Path(path) / CONFIG_NAME).read_text())
