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


# what makes a model directory the model it is: weights, configs, tokenizer files (sentencepiece .model, BPE
# merges/vocab .txt, tiktoken) and chat templates (.jinja)
MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".bin", ".model", ".jinja", ".txt", ".tiktoken")


def fingerprint_dir(path: str | Path, weights_only: bool = False) -> str:
    """Hash of a model directory's weight, config and tokenizer files (contents), the chat template included
    (transformers 5 keeps it in chat_template.jinja: a changed template is another model to every cache).
    `weights_only`: the weights and config.json alone (the same model in a folder with other metadata, a catalog
    entry's provenance say)."""
    h = hashlib.sha256()
    for p in sorted(Path(path).iterdir()):
        wanted = (p.suffix in (".safetensors", ".bin") or p.name == "config.json") if weights_only else \
            p.suffix in MODEL_FILE_SUFFIXES
        if wanted and p.is_file():
            h.update(p.name.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
    return h.hexdigest()[:20]


def fingerprint_path(path: str) -> str:
    """A model directory's fingerprint; a hub id stands for itself at the commit its cached `main` points to
    (`id@commit`: a moved `main` is another model), or for itself alone when it is not cached."""
    if Path(path).is_dir():
        return fingerprint_dir(path)
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(path, "config.json")
    except Exception:  # noqa: BLE001 - not a valid repo id for the hub client: the name alone
        return path
    return f"{path}@{Path(cached).parent.name}" if isinstance(cached, str) else path
