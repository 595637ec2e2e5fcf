"""Memory per GPU of a full fine-tune under FSDP2 with each mitigation, computed from parameter counts (not
measured): the tables in docs/distributed.md are this script's output (`python tools/fsdp_memory.py`), and
tests/test_fsdp_memory.py fails when they differ.

Bytes per parameter, each divided by the number of GPUs (every process keeps its slice):
- full fine-tuning: fp32 master weights 4 + fp32 gradients 4 + AdamW's two fp32 moments 8 = 16;
- l2sp: the anchor theta0 in fp32, 4;
- ewc: the anchor and the Fisher, 8;
- si: its start weights, path integral and two per-step scratch buffers, 16 (`save: true`, the default); with a
  previous run's importance, + that importance and its end weights, 8;
- kl: the frozen copy of the base, sharded as the model is: 2 in bf16 compute, 4 in fp32;
- replay, self_replay, freeze: no per-parameter state.
Not counted: activations (batch x length x layers; activation checkpointing cuts them), the transient full
copies FSDP gathers one block at a time, the CUDA context and allocator slack (plan 10-20% headroom).
At load time each process still holds the whole model before it is sharded (fp32: 4 bytes per parameter),
and EWC's Fisher and the KL copy are made from the whole model then.
"""

from __future__ import annotations

import sys

MODELS = {"Qwen2.5-7B (7.62B)": 7.62e9, "Llama-3.1-70B (70.55B)": 70.55e9}
BASE = 16
EXTRA = {
    "full FT": 0,
    "+ l2sp": 4,
    "+ ewc": 8,
    "+ si": 16,
    "+ si (with previous)": 24,
    "+ kl (bf16 copy)": 2,
    "+ ewc + kl + replay": 10,
}
GPUS = (8, 16, 64)


def table() -> str:
    lines = []
    for model, params in MODELS.items():
        lines.append(f"**{model}**, GB per GPU (sharded state only; 1 GB = 1e9 bytes)\n")
        lines.append("| recipe | bytes / parameter | " + " | ".join(f"{n} GPUs" for n in GPUS) + " |")
        lines.append("|---|---|" + "---|" * len(GPUS))
        for name, extra in EXTRA.items():
            b = BASE + extra
            cells = " | ".join(f"{b * params / n / 1e9:.1f}" for n in GPUS)
            lines.append(f"| {name} | {b} | {cells} |")
        whole = 4 * params / 1e9
        lines.append(f"\nAt load, each process holds the whole fp32 model first: {whole:.0f} GB.\n")
    return "\n".join(lines).rstrip() + "\n"


if __name__ == "__main__":
    sys.stdout.write(table())
