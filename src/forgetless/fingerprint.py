"""Model fingerprints: bit-exact hashes of a model's weights in memory or of a model directory's files. They key
every cache that depends on a model (baselines, Fishers, self-generated data, reference answers)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def fingerprint_model(model: nn.Module) -> str:
    """Hash of every parameter and buffer (bit-exact), for in-memory models."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        t = t.detach().cpu().contiguous()
        h.update(t.view(torch.uint8).numpy().tobytes() if t.dtype != torch.bool else t.numpy().tobytes())
    return h.hexdigest()[:20]


def fingerprint_dir(path: str | Path) -> str:
    """Hash of a model directory's weight and config files (contents)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).iterdir()):
        if p.suffix in (".safetensors", ".json", ".bin", ".model") and p.is_file():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()[:20]


def fingerprint_path(path: str) -> str:
    """A model directory's fingerprint; anything else (a hub id) stands for itself."""
    return fingerprint_dir(path) if Path(path).is_dir() else path
